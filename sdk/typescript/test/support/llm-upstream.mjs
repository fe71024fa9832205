// A scripted OpenAI-compatible upstream (chat completions, plain and streamed) for the gateway:
// it answers `text` with fixed token usage and records what it received.
import { createServer } from "node:http";

export const PROMPT_TOKENS = 1000;
export const COMPLETION_TOKENS = 200;
export const SECRET_ENV = "BULKHEAD_TS_TEST_UPSTREAM_KEY";
export const SECRET = "sk-upstream-secret-never-shown-to-agents";

/** The `bulkhead serve` TOML putting upstream `name` in front of `url` ($2.50 / $10 per million tokens). */
export function gatewayConfig(url, { name = "openai", scope = "llm:openai" } = {}) {
  return [
    "[[upstream]]",
    `name = "${name}"`,
    `base_url = "${url}"`,
    `scope = "${scope}"`,
    `secret_env = "${SECRET_ENV}"`,
    `max_cost_per_request = "0.50"`,
    `pricing = { kind = "openai_usage", input_per_million = "2.50", output_per_million = "10.00" }`,
    "",
  ].join("\n");
}

/** What one answer costs at `gatewayConfig`'s prices: 1000 × 2.50/M + 200 × 10/M. */
export const COST_PER_CALL = "0.0045";

export async function startLlmUpstream({ text = "Hello from the upstream." } = {}) {
  const requests = [];
  const server = createServer((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      let json = {};
      try {
        json = JSON.parse(body || "{}");
      } catch {}
      requests.push({ method: req.method, url: req.url, authorization: req.headers.authorization ?? null, body: json });
      if (req.method !== "POST" || req.url !== "/v1/chat/completions") {
        res.writeHead(404, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: { message: "no such route", type: "invalid_request_error" } }));
        return;
      }
      const id = `chatcmpl-${requests.length}`;
      const created = Math.floor(Date.now() / 1000);
      const model = json.model ?? "gpt-4o-mini";
      const usage = { prompt_tokens: PROMPT_TOKENS, completion_tokens: COMPLETION_TOKENS, total_tokens: PROMPT_TOKENS + COMPLETION_TOKENS };
      if (json.stream) {
        res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
        const chunk = (delta, finish, extra = {}) =>
          `data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model, choices: [{ index: 0, delta, finish_reason: finish }], ...extra })}\n\n`;
        res.write(chunk({ role: "assistant", content: "" }, null));
        for (const word of text.split(/(?<= )/)) res.write(chunk({ content: word }, null));
        res.write(chunk({}, "stop"));
        if (json.stream_options?.include_usage) {
          res.write(`data: ${JSON.stringify({ id, object: "chat.completion.chunk", created, model, choices: [], usage })}\n\n`);
        }
        res.end("data: [DONE]\n\n");
        return;
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end(
        JSON.stringify({
          id,
          object: "chat.completion",
          created,
          model,
          choices: [{ index: 0, message: { role: "assistant", content: text }, finish_reason: "stop" }],
          usage,
        }),
      );
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    text,
    close: () => new Promise((r) => server.close(r)),
  };
}
