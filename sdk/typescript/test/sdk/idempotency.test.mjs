// Money calls carry an Idempotency-Key and are retried with it: a lost answer never charges twice.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { AgentAccount, AgentClient, BulkheadConnectionError } from "bulkhead";
import { startDroppingProxy } from "../support/proxy.mjs";
import { startServer, uniqueHandle } from "../support/server.mjs";

const W = "payments:write";
let server;
let proxy;

before(async () => {
  server = await startServer();
  proxy = await startDroppingProxy(server.url);
});
after(async () => {
  await proxy?.close();
  await server?.stop();
});

async function make(fields = {}) {
  return AgentAccount.create({
    handle: uniqueHandle("idem"),
    scopes: [W],
    spendingCap: "10.00",
    url: server.url,
    adminToken: server.adminToken,
    ...fields,
  });
}

test("a spend whose answer was lost is retried with the same key and charged once", async () => {
  const account = await make();
  const client = new AgentClient(account.key, { url: proxy.url });
  const dropped = proxy.stats.dropped;
  proxy.dropNext();
  const receipt = await client.spend({ amount: "2.50", scope: W, memo: "lost answer" });
  assert.equal(proxy.stats.dropped, dropped + 1, "the first answer was lost");
  assert.equal(receipt.amount, "2.50");
  assert.equal(receipt.replayed, true, "the retry was answered from the idempotency record");
  assert.equal(receipt.remaining, "7.50");
  const usage = await account.usage();
  assert.equal(usage.windowSpent, "2.50");
  assert.equal(usage.txCount, 1);
  const spends = (await account.audit()).filter((e) => e.amount === "2.50" && e.outcome === "allowed");
  assert.equal(spends.length, 1);
});

test("hold, capture and release survive lost answers too", async () => {
  const account = await make();
  const client = new AgentClient(account.key, { url: proxy.url });
  proxy.dropNext();
  const hold = await client.hold({ amount: "3.00", scope: W });
  assert.equal(hold.replayed, true);
  assert.equal((await account.usage()).windowHeld, "3.00");
  proxy.dropNext();
  const s = await hold.capture("1.20");
  assert.equal(s.replayed, true);
  assert.deepEqual([s.captured, s.released], ["1.20", "1.80"]);
  const h2 = await client.hold({ amount: "1.00", scope: W });
  proxy.dropNext();
  const r = await h2.release();
  assert.equal(r.replayed, true);
  assert.equal(r.released, "1.00");
  const usage = await account.usage();
  assert.deepEqual([usage.windowSpent, usage.windowHeld], ["1.20", "0.00"]);
});

test("the caller's key makes a repeated logical call charge once", async () => {
  const account = await make();
  const client = account.client();
  const key = `invoice-${uniqueHandle()}`;
  const results = await Promise.all(
    Array.from({ length: 16 }, () => client.spend({ amount: "1.00", scope: W, idempotencyKey: key })),
  );
  assert.equal(new Set(results.map((r) => r.id)).size, 1);
  assert.equal(results.filter((r) => !r.replayed).length <= 1, true);
  const usage = await account.usage();
  assert.equal(usage.windowSpent, "1.00");
  assert.equal(usage.txCount, 1);
});

test("without retries the lost answer is a connection error whose outcome is unknown", async () => {
  const account = await make();
  const client = new AgentClient(account.key, { url: proxy.url, maxRetries: 0 });
  proxy.dropNext();
  const e = await client.spend({ amount: "1.00", scope: W, idempotencyKey: "retry-me-later" }).catch((x) => x);
  assert.ok(e instanceof BulkheadConnectionError, String(e));
  assert.match(e.message, /outcome is unknown/);
  // It did take effect; the same key learns it without paying twice.
  const again = await account.client().spend({ amount: "1.00", scope: W, idempotencyKey: "retry-me-later" });
  assert.equal(again.replayed, true);
  assert.equal((await account.usage()).windowSpent, "1.00");
});

test("an agent is never created twice by a retry", async () => {
  // A create is only retried when the request surely never left; a lost answer is an error.
  const handle = uniqueHandle("create");
  proxy.dropNext();
  const e = await AgentAccount.create({ handle, scopes: [W], spendingCap: "1", url: proxy.url, adminToken: server.adminToken }).catch((x) => x);
  assert.ok(e instanceof BulkheadConnectionError, String(e));
  const agent = await new AgentAccount(handle, { url: server.url, adminToken: server.adminToken }).refresh();
  assert.equal(agent.handle, handle);
});
