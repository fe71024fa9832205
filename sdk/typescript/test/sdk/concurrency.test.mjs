// Many concurrent spends racing one cap: never a micro-unit over.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { AgentAccount, LimitExceeded, toMicros } from "bulkhead";
import { startServer, uniqueHandle } from "../support/server.mjs";

const W = "payments:write";
let server;

before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

async function race(client, n, amount) {
  const outcomes = await Promise.allSettled(Array.from({ length: n }, () => client.spend({ amount, scope: W })));
  for (const o of outcomes) if (o.status === "rejected") assert.ok(o.reason instanceof LimitExceeded, String(o.reason));
  return outcomes.filter((o) => o.status === "fulfilled").length;
}

test("32 concurrent spends at one cap: overspend 0, spent = successes × amount", async () => {
  const account = await AgentAccount.create({
    handle: uniqueHandle("race"),
    scopes: [W],
    spendingCap: "1.00",
    url: server.url,
    adminToken: server.adminToken,
  });
  const successes = await race(account.client(), 32, "0.07");
  const usage = await account.usage();
  assert.equal(toMicros(usage.windowSpent), BigInt(successes) * toMicros("0.07"));
  assert.ok(toMicros(usage.windowSpent) <= toMicros("1.00"));
  assert.equal(successes, 14); // floor(1.00 / 0.07): every spend that fits was allowed
  assert.equal(usage.txCount, 14);
  assert.equal(usage.deniedCount, 18);
});

test("32 concurrent spends by two children at their parent's cap: the parent bounds the sum", async () => {
  const parent = await AgentAccount.create({
    handle: uniqueHandle("race-parent"),
    scopes: ["spawn:agents", W],
    spendingCap: "1.00",
    url: server.url,
    adminToken: server.adminToken,
  });
  const pc = parent.client();
  const a = await pc.spawn({ handle: uniqueHandle("race-a"), scopes: [W], spendingCap: "1.00" });
  const b = await pc.spawn({ handle: uniqueHandle("race-b"), scopes: [W], spendingCap: "1.00" });
  const [sa, sb] = await Promise.all([race(a.client(), 16, "0.07"), race(b.client(), 16, "0.07")]);
  const total = (await parent.usage()).windowSpent;
  assert.equal(toMicros(total), BigInt(sa + sb) * toMicros("0.07"));
  assert.equal(sa + sb, 14);
  assert.equal(toMicros((await a.usage()).windowSpent) + toMicros((await b.usage()).windowSpent), toMicros(total));
});
