// guard(): a Mastra tool that pays before it runs, with a fixed client or the run's.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { createTool } from "@mastra/core/tools";
import { z } from "zod";
import { AgentAccount } from "bulkhead";
import { guard, runClient } from "bulkhead/mastra";
import { startServer, uniqueHandle } from "../support/server.mjs";

let server;
let conn;
before(async () => {
  server = await startServer();
  conn = { url: server.url, adminToken: server.adminToken };
});
after(async () => {
  await server?.stop();
});

function countingTool() {
  const tool = createTool({
    id: "lookup",
    description: "Looks something up.",
    inputSchema: z.object({ q: z.string().min(1) }),
    outputSchema: z.object({ answer: z.string() }),
    execute: async ({ q }) => {
      tool.runs += 1;
      return { answer: `about ${q}` };
    },
  });
  tool.runs = 0;
  return tool;
}

test("each call is paid first; a refused spend never runs the tool and names the code", async () => {
  const account = await AgentAccount.create({ handle: uniqueHandle("guard"), scopes: ["tools:lookup"], spendingCap: "0.25", ...conn });
  const inner = countingTool();
  const tool = guard(inner, account.client(), { scope: "tools:lookup", cost: 0.1 });
  assert.equal(tool.id, "lookup");
  assert.equal(tool.description, "Looks something up.");
  assert.ok(tool.inputSchema && tool.outputSchema);

  assert.deepEqual(await tool.execute({ q: "one" }, {}), { answer: "about one" });
  assert.deepEqual(await tool.execute({ q: "two" }, {}), { answer: "about two" });
  const denied = await tool.execute({ q: "three" }, {}).catch((e) => e);
  assert.ok(denied instanceof Error);
  assert.match(denied.message, /^spending_cap_exceeded: .*\(tool 'lookup' did not run\)$/);
  assert.equal(denied.cause.code, "spending_cap_exceeded");
  assert.equal(inner.runs, 2);

  const usage = await account.usage();
  assert.equal(usage.windowSpent, "0.20");
  const trail = await account.audit();
  const paid = trail.filter((e) => e.scope === "tools:lookup" && e.amount === "0.10");
  assert.deepEqual(paid.map((e) => e.outcome), ["allowed", "allowed", "denied"]);
});

test("input the tool's schema refuses is neither paid nor run", async () => {
  const account = await AgentAccount.create({ handle: uniqueHandle("guard-schema"), scopes: ["tools:lookup"], spendingCap: "1.00", ...conn });
  const inner = countingTool();
  const tool = guard(inner, account.client(), { scope: "tools:lookup", cost: "0.10" });
  const result = await tool.execute({ q: "" }, {});
  assert.equal(result.error, true, JSON.stringify(result));
  assert.equal(inner.runs, 0);
  assert.equal((await account.usage()).txCount, 0);
});

test("a scope the key lacks, and no run to pay with, are tool errors too", async () => {
  const account = await AgentAccount.create({ handle: uniqueHandle("guard-scope"), scopes: ["tools:other"], spendingCap: "1.00", ...conn });
  const inner = countingTool();
  const wrongScope = guard(inner, account.client(), { scope: "tools:lookup", cost: "0.10" });
  await assert.rejects(wrongScope.execute({ q: "x" }, {}), /^BulkheadDenied: scope_not_granted: /);
  const noRun = guard(inner, runClient, { scope: "tools:lookup", cost: "0.10" });
  await assert.rejects(noRun.execute({ q: "x" }, {}), /^BulkheadDenied: no_run_account: /);
  assert.equal(inner.runs, 0);
  assert.throws(() => guard(inner, account.client(), { scope: "tools:lookup", cost: "0.1234567" }), RangeError);
});

test("metered(): holds the most a call may cost, captures what it did cost, releases on failure", async () => {
  const { metered } = await import("bulkhead/mastra");
  const account = await AgentAccount.create({ handle: uniqueHandle("metered"), scopes: ["tools:fetch"], spendingCap: "1.00", ...conn });
  let runs = 0;
  const fetchTool = createTool({
    id: "fetch",
    description: "Fetches a page; its price depends on the page.",
    inputSchema: z.object({ bytes: z.number() }),
    outputSchema: z.object({ cost: z.string() }),
    execute: async ({ bytes }) => {
      runs += 1;
      if (bytes < 0) throw new Error("the fetch failed");
      return { cost: (bytes / 1000).toFixed(3) };
    },
  });
  const tool = metered(fetchTool, account.client(), { scope: "tools:fetch", maxCost: "0.40", costOf: (r) => r.cost });
  assert.deepEqual(await tool.execute({ bytes: 120 }, {}), { cost: "0.120" });
  let usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.12", "0.00"]);
  // More than the hold is charged as the hold.
  await tool.execute({ bytes: 900 }, {});
  usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.52", "0.00"]);
  // A failing tool is charged nothing.
  await assert.rejects(tool.execute({ bytes: -1 }, {}), /the fetch failed/);
  usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.52", "0.00"]);
  // 0.48 left: a hold of 0.40 fits once more, then it is refused and the tool does not run.
  await tool.execute({ bytes: 400 }, {});
  const before = runs;
  const refused = await tool.execute({ bytes: 1 }, {}).catch((e) => e);
  assert.match(String(refused), /^BulkheadDenied: spending_cap_exceeded: .*\(tool 'fetch' did not run\)/);
  assert.equal(runs, before);
  usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.92", "0.00"]);
});

test("guard({hold, costOf}): a price of 0 releases the hold, an unreadable price charges all of it", async () => {
  const account = await AgentAccount.create({ handle: uniqueHandle("guard-hold"), scopes: ["tools:fetch"], spendingCap: "1.00", ...conn });
  const echo = createTool({
    id: "echo",
    description: "Echoes its price.",
    inputSchema: z.object({ price: z.string() }),
    execute: async ({ price }) => ({ price }),
  });
  const priced = guard(echo, account.client(), { scope: "tools:fetch", hold: "0.30", costOf: (r) => r.price });
  await priced.execute({ price: "0" }, {});
  let usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.00", "0.00"]);
  await priced.execute({ price: "not a price" }, {});
  usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.30", "0.00"]);
  const flat = guard(echo, account.client(), { scope: "tools:fetch", hold: "0.25" });
  assert.deepEqual(await flat.execute({ price: "0.01" }, {}), { price: "0.01" });
  usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["0.55", "0.00"]);
});
