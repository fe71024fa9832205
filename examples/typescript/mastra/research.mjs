// A Mastra workflow whose every run gets its own Bulkhead key.
//
// Each run of the `research` workflow is a child of one parent account, with its own caps; its
// agent pays for each web search (a guarded tool) with the run's key, and the key is revoked
// when the run ends. Two runs go at once: one loops (it would search forever) and is stopped at
// its cap; the other finishes. The parent's cap bounds them both.
//
//   BULKHEAD_URL=http://127.0.0.1:8080 BULKHEAD_ADMIN_TOKEN=… node research.mjs
//
// The agent's model is scripted (Mastra's mock model), so no LLM is needed. With
// MODEL=gpt-4o-mini the agent calls that model through the Bulkhead gateway's `openai` upstream
// instead, with the run's key (the parent then needs the `llm:openai` scope too).
import { Agent } from "@mastra/core/agent";
import { createTool } from "@mastra/core/tools";
import { createStep, createWorkflow } from "@mastra/core/workflows";
import { MastraLanguageModelV2Mock } from "@mastra/core/test-utils/llm-mock";
import { z } from "zod";
import { AgentAccount } from "bulkhead";
import { guard, model, runAccount, runClient, runContext, withRunAccount } from "bulkhead/mastra";

const LLM = process.env.MODEL;
const scopes = LLM ? ["tools:search", "llm:openai"] : ["tools:search"];

// 1. The parent: an account allowed to spawn children, $1.00 per hour for all runs together.
const parent = await AgentAccount.create({
  handle: `research-team-${Date.now().toString(36)}`,
  scopes: ["spawn:agents", ...scopes],
  spendingCap: "1.00",
  window: "1h",
});
console.log(`parent ${parent.handle}: cap $1.00/h`);

// 2. A paid tool: each search costs $0.10, paid with the key of the run that calls it.
const searchTool = createTool({
  id: "search",
  description: "Searches the web.",
  inputSchema: z.object({ q: z.string() }),
  outputSchema: z.object({ hits: z.array(z.string()) }),
  execute: async ({ q }) => ({ hits: [`a result for ${q}`] }),
});
const search = guard(searchTool, runClient, { scope: "tools:search", cost: "0.10" });

// A stand-in for the LLM: it searches `calls` times (or forever), then answers.
function scripted(calls) {
  let n = 0;
  const usage = { inputTokens: 10, outputTokens: 5, totalTokens: 15 };
  return new MastraLanguageModelV2Mock({
    doGenerate: async ({ prompt }) => {
      const results = prompt.filter((m) => m.role === "tool").flatMap((m) => m.content);
      const error = results.find((p) => p.output?.type === "error-text");
      if (error) return { content: [{ type: "text", text: `stopped: ${error.output.value}` }], finishReason: "stop", usage, warnings: [] };
      if (results.length >= calls) return { content: [{ type: "text", text: `found it after ${results.length} searches` }], finishReason: "stop", usage, warnings: [] };
      n += 1;
      return { content: [{ type: "tool-call", toolCallId: `c${n}`, toolName: "search", input: JSON.stringify({ q: `page ${n}` }) }], finishReason: "tool-calls", usage, warnings: [] };
    },
  });
}

// 3. The step: an agent with the guarded tool (and, with MODEL set, a model through the gateway).
const research = createStep({
  id: "research",
  inputSchema: z.object({ question: z.string(), searches: z.number() }),
  outputSchema: z.object({ answer: z.string(), handle: z.string() }),
  execute: async (params) => {
    const { question, searches } = params.inputData;
    const agent = new Agent({
      id: "researcher",
      name: "researcher",
      instructions: "Search the web, then answer.",
      model: LLM ? model(runClient(params), LLM) : scripted(searches < 0 ? Infinity : searches),
      tools: { search },
    });
    const answer = await agent.generate(question, { requestContext: runContext(params), maxSteps: 50 });
    if (answer.text.startsWith("stopped")) throw new Error(answer.text);
    return { answer: answer.text, handle: runAccount(params).handle };
  },
});

// 4. The workflow: each run gets a child of the parent, $0.50/h, revoked when the run ends.
const workflow = createWorkflow(
  withRunAccount(
    { id: "research", inputSchema: research.inputSchema, outputSchema: research.outputSchema },
    { parent: parent.client(), scopes, spendingCap: "0.50", window: "1h", expiresIn: "1h" },
  ),
)
  .then(research)
  .commit();

const looping = await workflow.createRun();
const bounded = await workflow.createRun();
const [a, b] = await Promise.all([
  looping.start({ inputData: { question: "Everything about bulkheads?", searches: -1 } }),
  bounded.start({ inputData: { question: "Who invented the bulkhead?", searches: 3 } }),
]);
console.log(`run ${looping.runId}: ${a.status}${a.error ? ` (${a.error.message ?? a.error})` : ""}`);
console.log(`run ${bounded.runId}: ${b.status}${b.result ? ` (${b.result.answer})` : ""}`);

// 5. What the server saw: one child per run, each revoked, the parent paying for both.
const children = (await AgentAccount.list({ limit: 1000 })).filter((c) => c.parent === parent.handle);
for (const c of children) console.log(`child ${c.handle}: spent $${c.usage.windowSpent}, ${c.status}`);
console.log(`parent ${parent.handle}: spent $${(await parent.usage()).windowSpent} of $1.00`);
await parent.revoke({ reason: "example finished" });
