// Mastra's mock language model, scripted to call one tool `calls` times (or until the tool
// fails), then answer with text. The only mock in the Mastra tests: everything else is real.
import { MastraLanguageModelV2Mock } from "@mastra/core/test-utils/llm-mock";

const usage = { inputTokens: 10, outputTokens: 5, totalTokens: 15 };

function toolMessages(prompt) {
  return prompt.filter((m) => m.role === "tool").flatMap((m) => m.content);
}

/** The text of a tool error the model was shown, or null. */
export function toolError(part) {
  const out = part.output;
  if (out && (out.type === "error-text" || out.type === "error-json")) return String(typeof out.value === "string" ? out.value : JSON.stringify(out.value));
  return null;
}

/**
 * A model that calls `toolName` with `{q}` until it has seen `calls` results (`Infinity` loops
 * until the tool fails), then says what happened.
 */
export function scriptedModel({ toolName, calls = Infinity }) {
  let n = 0;
  return new MastraLanguageModelV2Mock({
    doGenerate: async ({ prompt }) => {
      const results = toolMessages(prompt);
      const failed = results.map(toolError).find((e) => e !== null);
      if (failed) {
        return { content: [{ type: "text", text: `stopped: ${failed}` }], finishReason: "stop", usage, warnings: [] };
      }
      if (results.length >= calls) {
        return { content: [{ type: "text", text: `done after ${results.length} calls` }], finishReason: "stop", usage, warnings: [] };
      }
      n += 1;
      return {
        content: [{ type: "tool-call", toolCallId: `call-${n}`, toolName, input: JSON.stringify({ q: `query ${n}` }) }],
        finishReason: "tool-calls",
        usage,
        warnings: [],
      };
    },
  });
}
