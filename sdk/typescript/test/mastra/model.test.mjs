// model(): a Mastra agent calls its LLM through the real Bulkhead gateway with the run's key.
// The upstream LLM is scripted; the server, gateway, metering and Mastra are real.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Agent } from "@mastra/core/agent";
import { createStep, createWorkflow } from "@mastra/core/workflows";
import { z } from "zod";
import { AgentAccount, AgentClient, fromMicros, toMicros } from "bulkhead";
import { model, runAccount, runClient, withRunAccount } from "bulkhead/mastra";
import { COST_PER_CALL, SECRET, SECRET_ENV, gatewayConfig, startLlmUpstream } from "../support/llm-upstream.mjs";
import { startServer, uniqueHandle, waitFor } from "../support/server.mjs";

let upstream;
let server;
let conn;

before(async () => {
  upstream = await startLlmUpstream();
  server = await startServer({ config: gatewayConfig(upstream.url), env: { [SECRET_ENV]: SECRET } });
  conn = { url: server.url, adminToken: server.adminToken };
});
after(async () => {
  await server?.stop();
  await upstream?.close();
});

test("model() is Mastra's OpenAI-compatible config for the gateway, with the client's key", () => {
  const client = new AgentClient("bk_example", { url: "http://127.0.0.1:8080" });
  assert.deepEqual(model(client, "gpt-4o-mini"), {
    providerId: "openai",
    modelId: "gpt-4o-mini",
    url: "http://127.0.0.1:8080/proxy/openai/v1",
    apiKey: "bk_example",
  });
  assert.equal(model(client, "claude", { upstream: "anthropic-compat", api: "chat" }).url, "http://127.0.0.1:8080/proxy/anthropic-compat/v1");
});

test("a workflow run's agent calls the LLM through the gateway with the run's key, metered to the run", async () => {
  const parent = await AgentAccount.create({
    handle: uniqueHandle("writer"),
    scopes: ["spawn:agents", "llm:openai"],
    spendingCap: "5.00",
    ...conn,
  });
  const keys = new Map();
  const write = createStep({
    id: "write",
    inputSchema: z.object({ topic: z.string() }),
    outputSchema: z.object({ text: z.string() }),
    execute: async (params) => {
      keys.set(params.runId, runAccount(params));
      const agent = new Agent({
        id: "writer",
        name: "writer",
        instructions: "Write one sentence.",
        model: model(runClient(params), "gpt-4o-mini"),
      });
      const plain = await agent.generate(`Write about ${params.inputData.topic}.`);
      const streamed = await agent.stream(`Write more about ${params.inputData.topic}.`);
      const text2 = await streamed.text;
      return { text: `${plain.text} | ${text2}` };
    },
  });
  const workflow = createWorkflow(
    withRunAccount(
      { id: "writer", inputSchema: z.object({ topic: z.string() }), outputSchema: z.object({ text: z.string() }) },
      { parent: parent.client(), scopes: ["llm:openai"], spendingCap: "1.00" },
    ),
  )
    .then(write)
    .commit();
  const run = await workflow.createRun();
  const before = upstream.requests.length;
  const result = await run.start({ inputData: { topic: "bulkheads" } });
  assert.equal(result.status, "success", JSON.stringify(result.error));
  assert.equal(result.result.text, `${upstream.text} | ${upstream.text}`);

  // The upstream saw the real secret, never the run's key.
  const seen = upstream.requests.slice(before);
  assert.equal(seen.length, 2);
  const account = keys.get(run.runId);
  for (const r of seen) {
    assert.equal(r.url, "/v1/chat/completions");
    assert.equal(r.authorization, `Bearer ${SECRET}`);
    assert.equal(r.body.model, "gpt-4o-mini");
    assert.ok(!JSON.stringify(r).includes(account.key));
  }

  // Both calls were metered to the run's account (and so to its parent).
  const child = new AgentAccount(account.handle, conn);
  const expected = fromMicros(2n * toMicros(COST_PER_CALL));
  await waitFor(async () => toMicros((await child.usage()).windowSpent) === toMicros(expected), { what: `the run's spend to reach ${expected}` });
  assert.equal(toMicros((await parent.usage()).windowSpent), toMicros(expected));
  assert.ok((await child.audit({ limit: 1000 })).some((e) => e.outcome === "allowed" && e.scope === "llm:openai"));

  // After the run its key no longer reaches the upstream.
  assert.equal((await child.refresh()).status, "revoked");
  const after = upstream.requests.length;
  const denied = await fetch(`${server.url}/proxy/openai/v1/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${account.key}`, "content-type": "application/json" },
    body: JSON.stringify({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] }),
  });
  assert.equal(denied.status, 401);
  assert.equal((await denied.json()).error.code, "credential_revoked");
  assert.equal(upstream.requests.length, after);
});
