// A real Mastra workflow whose runs each get their own Bulkhead account, against a real server.
// The only mock is the language model (Mastra's own, scripted).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Agent } from "@mastra/core/agent";
import { RequestContext } from "@mastra/core/request-context";
import { createTool } from "@mastra/core/tools";
import { createStep, createWorkflow } from "@mastra/core/workflows";
import { z } from "zod";
import { AgentAccount, CapEscalation, CredentialRevoked } from "bulkhead";
import { RUN_ACCOUNT_KEY, activeRunAccounts, guard, runAccount, runClient, runContext, runHandle, withRunAccount } from "bulkhead/mastra";
import { scriptedModel, toolError } from "../support/scripted-model.mjs";
import { startServer, uniqueHandle, waitFor } from "../support/server.mjs";

const SEARCH = "tools:search";
let server;
let conn;

before(async () => {
  server = await startServer();
  conn = { url: server.url, adminToken: server.adminToken };
});
after(async () => {
  await server?.stop();
});

const searchTool = createTool({
  id: "search",
  description: "Searches the web.",
  inputSchema: z.object({ q: z.string() }),
  outputSchema: z.object({ hits: z.array(z.string()) }),
  execute: async ({ q }) => ({ hits: [`a result for ${q}`] }),
});

/** A research workflow: an agent driven by the scripted model calls the guarded search tool. */
function researchWorkflow({ id, parent, spendingCap, seen }) {
  const search = guard(searchTool, runClient, { scope: SEARCH, cost: "0.10" });
  const research = createStep({
    id: "research",
    inputSchema: z.object({ calls: z.number() }),
    outputSchema: z.object({ handle: z.string(), calls: z.number(), text: z.string() }),
    execute: async (params) => {
      const account = runAccount(params);
      seen.set(params.runId, { handle: account.handle, key: account.key });
      const calls = params.inputData.calls < 0 ? Infinity : params.inputData.calls;
      const agent = new Agent({
        id: "researcher",
        name: "researcher",
        instructions: "Search until you know enough.",
        model: scriptedModel({ toolName: "search", calls }),
        tools: { search },
      });
      const answer = await agent.generate("Find everything.", { requestContext: runContext(params), maxSteps: 100 });
      const results = answer.steps.flatMap((s) => s.content ?? []).filter((p) => p.type === "tool-result");
      const errors = answer.steps.flatMap((s) => s.content ?? []).filter((p) => p.type === "tool-error");
      if (errors.length > 0 || answer.text.startsWith("stopped")) throw new Error(answer.text);
      return { handle: account.handle, calls: results.length, text: answer.text };
    },
  });
  return createWorkflow(
    withRunAccount(
      { id, inputSchema: z.object({ calls: z.number() }), outputSchema: research.outputSchema },
      { parent, scopes: [SEARCH], spendingCap, window: "1h", expiresIn: "1h" },
    ),
  )
    .then(research)
    .commit();
}

async function makeParent(spendingCap) {
  return AgentAccount.create({ handle: uniqueHandle("research"), scopes: ["spawn:agents", SEARCH], spendingCap, window: "1h", ...conn });
}

async function childrenOf(parent) {
  return (await AgentAccount.list({ ...conn, limit: 1000 })).filter((a) => a.parent === parent.handle);
}

test("two runs at once: a key each, the looping one stops at its cap, both keys revoked after", async () => {
  const parent = await makeParent("1.00");
  const seen = new Map();
  const workflow = researchWorkflow({ id: "research", parent: parent.client(), spendingCap: "0.50", seen });
  const looping = await workflow.createRun();
  const bounded = await workflow.createRun();
  const [a, b] = await Promise.all([looping.start({ inputData: { calls: -1 } }), bounded.start({ inputData: { calls: 3 } })]);

  // The looping run was stopped by its own cap, the other completed.
  assert.equal(a.status, "failed");
  assert.match(String(a.error?.message ?? a.error), /spending_cap_exceeded/);
  assert.match(String(a.error?.message ?? a.error), /tool 'search' did not run/);
  assert.equal(b.status, "success", JSON.stringify(b.error));
  assert.equal(b.result.calls, 3);
  assert.equal(b.result.text, "done after 3 calls");

  // Each run had its own key, a child of the parent named after the run.
  const ka = seen.get(looping.runId);
  const kb = seen.get(bounded.runId);
  assert.equal(ka.handle, runHandle(`run-${looping.runId}`));
  assert.equal(kb.handle, `run-${bounded.runId}`);
  assert.notEqual(ka.key, kb.key);
  assert.notEqual(ka.key, parent.key);
  const children = await childrenOf(parent);
  assert.deepEqual(children.map((c) => c.handle).sort(), [ka.handle, kb.handle].sort());
  assert.ok(children.every((c) => c.scopes.length === 1 && c.scopes[0] === SEARCH && c.spendingCap === "0.50"));
  assert.deepEqual(children.find((c) => c.handle === kb.handle).labels, { workflow: "research", run: bounded.runId });

  // The audit trails: five paid searches then a denial for one run, three for the other.
  const trailA = await new AgentAccount(ka.handle, conn).audit({ limit: 1000 });
  const trailB = await new AgentAccount(kb.handle, conn).audit({ limit: 1000 });
  const spends = (trail) => trail.filter((e) => e.scope === SEARCH && e.amount === "0.10");
  assert.equal(spends(trailA).filter((e) => e.outcome === "allowed").length, 5);
  assert.deepEqual(spends(trailA).filter((e) => e.outcome === "denied").map((e) => e.reason), ["spending_cap_exceeded"]);
  assert.equal(spends(trailB).filter((e) => e.outcome === "allowed").length, 3);
  assert.ok(trailA.every((e) => e.agent === ka.handle) && trailB.every((e) => e.agent === kb.handle));

  // Both keys are revoked once the runs are over (failed and successful alike).
  assert.ok(children.every((c) => c.status === "revoked" && c.revokedAt), JSON.stringify(children.map((c) => c.status)));
  for (const { key } of [ka, kb]) {
    await assert.rejects(new AgentAccount("x", { ...conn, key }).client().spend({ amount: "0.01", scope: SEARCH }), CredentialRevoked);
  }
  assert.equal(activeRunAccounts().size, 0);

  // The parent paid for both: 0.50 + 0.30.
  assert.equal((await parent.usage()).windowSpent, "0.80");
});

test("the parent's cap bounds the sum of concurrent runs", async () => {
  const parent = await makeParent("0.70");
  const seen = new Map();
  const workflow = researchWorkflow({ id: "research-bounded", parent: parent.client(), spendingCap: "0.50", seen });
  const runs = [await workflow.createRun(), await workflow.createRun()];
  const results = await Promise.all(runs.map((r) => r.start({ inputData: { calls: -1 } })));
  for (const r of results) {
    assert.equal(r.status, "failed");
    assert.match(String(r.error?.message ?? r.error), /(spending|ancestor)_cap_exceeded/);
  }
  assert.ok(results.some((r) => /ancestor_cap_exceeded/.test(String(r.error?.message ?? r.error))), "the parent's cap stopped a run");
  const usage = await parent.usage();
  assert.equal(usage.windowSpent, "0.70");
  const children = await childrenOf(parent);
  assert.equal(children.length, 2);
  const sum = children.reduce((s, c) => s + Math.round(Number(c.usage.windowSpent) * 100), 0);
  assert.equal(sum, 70);
  assert.ok(children.every((c) => c.status === "revoked"));
});

test("a canceled run's key is revoked; a run its parent may not fund never starts", async () => {
  const parent = await makeParent("1.00");
  let started;
  const entered = new Promise((r) => (started = r));
  const seen = new Map();
  const slow = createStep({
    id: "slow",
    inputSchema: z.object({}),
    outputSchema: z.object({}),
    execute: async (params) => {
      seen.set(params.runId, runAccount(params));
      started();
      await new Promise((resolve) => params.abortSignal.addEventListener("abort", resolve, { once: true }));
      return {};
    },
  });
  const workflow = createWorkflow(
    withRunAccount({ id: "slow", inputSchema: z.object({}), outputSchema: z.object({}) }, { parent: parent.client(), scopes: [SEARCH], spendingCap: "0.20" }),
  )
    .then(slow)
    .commit();
  const run = await workflow.createRun();
  const pending = run.start({ inputData: {} });
  await entered;
  const account = seen.get(run.runId);
  await account.client().spend({ amount: "0.05", scope: SEARCH });
  await run.cancel();
  const result = await pending;
  assert.equal(result.status, "canceled");
  const asAdmin = new AgentAccount(account.handle, conn);
  await waitFor(async () => (await asAdmin.refresh()).status === "revoked", { what: "the canceled run's revocation" });
  await assert.rejects(account.client().spend({ amount: "0.01", scope: SEARCH }), CredentialRevoked);

  // A child may not have more than its parent: the run is refused before any step runs.
  const greedy = createWorkflow(
    withRunAccount({ id: "greedy", inputSchema: z.object({}), outputSchema: z.object({}) }, { parent: parent.client(), scopes: [SEARCH], spendingCap: "5.00" }),
  )
    .then(slow)
    .commit();
  const before = seen.size;
  const refused = await greedy.createRun();
  await assert.rejects(refused.start({ inputData: {} }), CapEscalation);
  assert.equal(seen.size, before);
  assert.equal((await childrenOf(parent)).length, 1);
});

test("a requestContext given to start carries the account; the workflow's own hooks still run", async () => {
  const parent = await makeParent("1.00");
  const events = [];
  const step = createStep({
    id: "pay",
    inputSchema: z.object({}),
    outputSchema: z.object({ same: z.boolean() }),
    execute: async ({ requestContext, runId }) => {
      const account = requestContext.get(RUN_ACCOUNT_KEY);
      await runClient({ requestContext }).spend({ amount: "0.10", scope: SEARCH });
      return { same: account === runAccount({ runId }) };
    },
  });
  const workflow = createWorkflow(
    withRunAccount(
      {
        id: "hooks",
        inputSchema: z.object({}),
        outputSchema: z.object({ same: z.boolean() }),
        options: {
          onStart: ({ requestContext }) => events.push(["start", requestContext.get(RUN_ACCOUNT_KEY)?.handle]),
          onFinish: ({ status, requestContext }) => events.push(["finish", status, requestContext.get(RUN_ACCOUNT_KEY)?.handle]),
        },
      },
      { parent: parent.client(), scopes: [SEARCH], spendingCap: "0.20", handle: ({ runId }) => `Hooks Run ${runId}` },
    ),
  )
    .then(step)
    .commit();
  const run = await workflow.createRun();
  const requestContext = new RequestContext();
  const result = await run.start({ inputData: {}, requestContext });
  assert.equal(result.status, "success");
  assert.equal(result.result.same, true);
  const handle = `hooks-run-${run.runId}`;
  assert.deepEqual(events, [["start", handle], ["finish", "success", handle]]);
  const account = requestContext.get(RUN_ACCOUNT_KEY);
  assert.equal(account.handle, handle);
  assert.equal((await new AgentAccount(handle, conn).refresh()).status, "revoked");
  assert.equal((await parent.usage()).windowSpent, "0.10");
  assert.throws(() => runAccount({ runId: run.runId }), (e) => e.code === "no_run_account");
});

test("run handles fit the server's alphabet", () => {
  assert.equal(runHandle("run-3F2A_b.c"), "run-3f2a_b.c");
  assert.equal(runHandle("--Run  Über 7--"), "run-ber-7");
  assert.equal(runHandle("run-" + "x".repeat(100)).length, 64);
  assert.throws(() => runHandle("---"), RangeError);
});

test("runs started with stream() and startAsync() get and lose their accounts the same way", async () => {
  const parent = await makeParent("1.00");
  const step = createStep({
    id: "pay",
    inputSchema: z.object({}),
    outputSchema: z.object({ handle: z.string() }),
    execute: async (params) => {
      const client = runClient(params);
      await client.spend({ amount: "0.10", scope: SEARCH });
      return { handle: (await client.me()).handle };
    },
  });
  const workflow = createWorkflow(
    withRunAccount({ id: "paying", inputSchema: z.object({}), outputSchema: z.object({ handle: z.string() }) }, { parent: parent.client(), scopes: [SEARCH], spendingCap: "0.20" }),
  )
    .then(step)
    .commit();
  const streamed = await workflow.createRun();
  const output = streamed.stream({ inputData: {} });
  for await (const _ of output.fullStream) {
    // drain
  }
  const result = await output.result;
  assert.equal(result.status, "success");
  assert.equal(result.result.handle, `run-${streamed.runId}`);

  const background = await workflow.createRun();
  const { runId } = await background.startAsync({ inputData: {} });
  assert.equal(runId, background.runId);
  await waitFor(
    async () => {
      const children = await childrenOf(parent);
      return children.length === 2 && children.every((c) => c.status === "revoked");
    },
    { what: "both runs' accounts to be revoked" },
  );
  assert.equal((await parent.usage()).windowSpent, "0.20");
});

test("two runs sharing one requestContext still pay with their own keys", async () => {
  const parent = await makeParent("1.00");
  const step = createStep({
    id: "pay",
    inputSchema: z.object({ amount: z.string() }),
    outputSchema: z.object({ handle: z.string() }),
    execute: async (params) => {
      await new Promise((r) => setTimeout(r, 50)); // both runs have started by now
      const client = runClient(params);
      await client.spend({ amount: params.inputData.amount, scope: SEARCH });
      return { handle: (await client.me()).handle };
    },
  });
  const workflow = createWorkflow(
    withRunAccount({ id: "shared", inputSchema: z.object({ amount: z.string() }), outputSchema: z.object({ handle: z.string() }) }, { parent: parent.client(), scopes: [SEARCH], spendingCap: "0.50" }),
  )
    .then(step)
    .commit();
  const shared = new RequestContext();
  const [r1, r2] = [await workflow.createRun(), await workflow.createRun()];
  const [a, b] = await Promise.all([
    r1.start({ inputData: { amount: "0.10" }, requestContext: shared }),
    r2.start({ inputData: { amount: "0.20" }, requestContext: shared }),
  ]);
  assert.equal(a.result.handle, `run-${r1.runId}`);
  assert.equal(b.result.handle, `run-${r2.runId}`);
  const spent = Object.fromEntries((await childrenOf(parent)).map((c) => [c.handle, c.usage.windowSpent]));
  assert.deepEqual(spent, { [`run-${r1.runId}`]: "0.10", [`run-${r2.runId}`]: "0.20" });
});
