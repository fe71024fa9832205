// Every call of the SDK against a real `bulkhead serve`, and exact amounts.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AgentAccount,
  AgentClient,
  CredentialRevoked,
  HoldClosed,
  amountText,
  fromMicros,
  toMicros,
} from "bulkhead";
import { startServer, uniqueHandle } from "../support/server.mjs";

const W = "payments:write";
let server;
let conn;

before(async () => {
  server = await startServer();
  conn = { url: server.url, adminToken: server.adminToken };
});
after(async () => {
  await server?.stop();
});

function make(fields = {}) {
  return AgentAccount.create({
    handle: uniqueHandle(),
    scopes: [W, "invoices:read"],
    spendingCap: "50.00",
    ...conn,
    ...fields,
  });
}

describe("amounts", () => {
  test("strings, bigints and numbers become exact decimal strings", () => {
    assert.equal(amountText("2.50"), "2.50");
    assert.equal(amountText("0.000150"), "0.000150");
    assert.equal(amountText(".5"), "0.5");
    assert.equal(amountText("7."), "7");
    assert.equal(amountText("1.5000000"), "1.500000");
    assert.equal(amountText(2n), "2");
    assert.equal(amountText(50), "50");
    assert.equal(amountText(2.5), "2.5");
    assert.equal(amountText(0.1), "0.1");
    assert.equal(amountText(0.000001), "0.000001");
    assert.equal(amountText(123456.789012), "123456.789012");
    assert.equal(amountText(-0), "0");
  });

  test("anything inexact or not an amount is refused before sending", () => {
    for (const bad of [0.0000001, 1e21, NaN, Infinity, -Infinity, -1, -0.5, 1.0000001]) {
      assert.throws(() => amountText(bad), RangeError, String(bad));
    }
    for (const bad of ["-1", "1e3", "1.2.3", "", " 1", "abc", "1,5", "0x10", "1.0000001", "NaN", "Infinity"]) {
      assert.throws(() => amountText(bad), RangeError, JSON.stringify(bad));
    }
    assert.throws(() => amountText(-1n), RangeError);
    for (const bad of [null, undefined, true, {}, ["1"]]) {
      assert.throws(() => amountText(bad), TypeError, String(bad));
    }
  });

  test("micro-units round-trip", () => {
    assert.equal(toMicros("2.50"), 2_500_000n);
    assert.equal(toMicros(0.000001), 1n);
    assert.equal(fromMicros(2_500_000n), "2.50");
    assert.equal(fromMicros(150n), "0.00015");
    assert.equal(fromMicros(toMicros("1000000000000")), "1000000000000.00");
  });

  test("a refused amount sends nothing", async () => {
    const account = await make();
    const client = account.client();
    await assert.rejects(client.spend({ amount: 0.1234567, scope: W }), RangeError);
    await assert.rejects(client.spend({ amount: -2, scope: W }), RangeError);
    await assert.rejects(client.hold({ amount: NaN, scope: W }), RangeError);
    await assert.rejects(make({ spendingCap: 1e-7 }), RangeError);
    const usage = await account.usage();
    assert.equal(usage.txCount, 0);
    assert.equal(usage.deniedCount, 0);
    assert.equal(usage.windowSpent, "0.00");
  });

  test("numbers and strings are charged exactly, to the micro-unit", async () => {
    const account = await make({ spendingCap: 10 });
    const client = account.client();
    const amounts = [0.1, 0.2, "0.000001", 3n, 0.3, "1.999999"];
    let total = 0n;
    for (const amount of amounts) {
      const r = await client.spend({ amount, scope: W });
      assert.equal(toMicros(r.amount), toMicros(amount));
      total += toMicros(amount);
      assert.equal(toMicros(r.remaining), 10_000_000n - total);
    }
    const usage = await account.usage();
    assert.equal(toMicros(usage.windowSpent), total);
    assert.equal(usage.windowSpent, "5.60");
    assert.equal(typeof usage.windowSpent, "string");
  });
});

describe("AgentAccount and AgentClient", () => {
  test("create: every field, the key once, the agent object", async () => {
    const handle = uniqueHandle("invoice");
    const account = await AgentAccount.create({
      handle,
      scopes: [W, "invoices:read"],
      spendingCap: "50.00",
      perTxLimit: 5,
      window: "24h",
      lifetimeCap: "500",
      rateLimit: { requests: 600, per: "60s" },
      expiresIn: "30d",
      labels: { team: "billing" },
      ...conn,
    });
    assert.equal(account.handle, handle);
    assert.match(account.key, /^bk_[0-9A-Za-z]+$/);
    const agent = account.agent;
    assert.equal(agent.handle, handle);
    assert.equal(agent.parent, null);
    assert.equal(agent.status, "active");
    assert.deepEqual(agent.scopes, [W, "invoices:read"]);
    assert.equal(agent.spendingCap, "50.00");
    assert.equal(agent.perTxLimit, "5.00");
    assert.equal(agent.lifetimeCap, "500.00");
    assert.deepEqual(agent.rateLimit, { requests: 600, per: "60s" });
    assert.equal(agent.window, "24h");
    assert.deepEqual(agent.labels, { team: "billing" });
    assert.ok(agent.expiresAt);
    assert.ok(!("key" in agent) || agent.key === undefined);
    assert.ok(!String(account).includes(account.key));
    assert.ok(!JSON.stringify(account.client()).includes(account.key));
  });

  test("the environment supplies the server and the admin token", async () => {
    const saved = { url: process.env.BULKHEAD_URL, token: process.env.BULKHEAD_ADMIN_TOKEN };
    process.env.BULKHEAD_URL = server.url + "/";
    process.env.BULKHEAD_ADMIN_TOKEN = server.adminToken;
    try {
      const account = await AgentAccount.create({ handle: uniqueHandle("env"), scopes: [W], spendingCap: "1.00" });
      assert.equal(account.url, server.url);
      assert.equal(account.client().url, server.url);
      assert.equal((await account.client().me()).handle, account.handle);
    } finally {
      if (saved.url === undefined) delete process.env.BULKHEAD_URL;
      else process.env.BULKHEAD_URL = saved.url;
      if (saved.token === undefined) delete process.env.BULKHEAD_ADMIN_TOKEN;
      else process.env.BULKHEAD_ADMIN_TOKEN = saved.token;
    }
    const saved2 = process.env.BULKHEAD_ADMIN_TOKEN;
    delete process.env.BULKHEAD_ADMIN_TOKEN;
    try {
      await assert.rejects(
        AgentAccount.create({ handle: uniqueHandle(), scopes: [W], spendingCap: "1", url: server.url }),
        /admin token/,
      );
    } finally {
      if (saved2 !== undefined) process.env.BULKHEAD_ADMIN_TOKEN = saved2;
    }
  });

  test("spend returns a receipt; me and usage follow", async () => {
    const account = await make({ perTxLimit: "5.00" });
    const client = account.client();
    const r = await client.spend({ amount: "2.50", scope: W, memo: "invoice 4711" });
    assert.match(r.id, /\S/);
    assert.equal(r.amount, "2.50");
    assert.equal(r.remaining, "47.50");
    assert.equal(r.remainingLifetime, null);
    assert.ok(r.windowResetsAt);
    assert.equal(r.replayed, false);
    const me = await client.me();
    assert.equal(me.handle, account.handle);
    assert.equal(me.usage.windowSpent, "2.50");
    assert.equal(me.usage.txCount, 1);
    assert.ok(Math.abs(me.usage.utilization - 0.05) < 1e-9);
    const usage = await account.usage();
    assert.equal(usage.lifetimeSpent, "2.50");
  });

  test("hold, capture and release; withHold releases what is not captured", async () => {
    const account = await make({ spendingCap: "10.00" });
    const client = account.client();
    const hold = await client.hold({ amount: "1.00", scope: W, expiresIn: "5m" });
    assert.match(hold.id, /\S/);
    assert.equal(hold.amount, "1.00");
    assert.ok(hold.expiresAt);
    assert.equal((await account.usage()).windowHeld, "1.00");
    const s = await hold.capture("0.40");
    assert.equal(s.captured, "0.40");
    assert.equal(s.released, "0.60");
    assert.ok(hold.closed);
    await assert.rejects(hold.release(), HoldClosed);

    const h2 = await client.hold({ amount: "2.00", scope: W });
    const rel = await h2.release();
    assert.equal(rel.released, "2.00");

    const value = await client.withHold({ amount: "3.00", scope: W }, async (h) => {
      assert.equal((await account.usage()).windowHeld, "3.00");
      return 42;
    });
    assert.equal(value, 42);
    await assert.rejects(
      client.withHold({ amount: "3.00", scope: W }, async () => {
        throw new Error("the work failed");
      }),
      /the work failed/,
    );
    const captured = await client.withHold({ amount: "3.00", scope: W }, (h) => h.capture("1.25"));
    assert.equal(captured.captured, "1.25");
    const usage = await account.usage();
    assert.equal(usage.windowHeld, "0.00");
    assert.equal(usage.windowSpent, "1.65");

    const byId = await client.hold({ amount: "0.50", scope: W });
    assert.equal((await client.capture(byId.id, "0.50")).captured, "0.50");
    const byId2 = await client.hold({ amount: "0.50", scope: W });
    assert.equal((await client.release(byId2.id)).released, "0.50");
  });

  test("await using releases an open hold", async () => {
    const account = await make({ spendingCap: "10.00" });
    const client = account.client();
    const hold = await client.hold({ amount: "4.00", scope: W });
    await hold[Symbol.asyncDispose]();
    assert.equal(hold.settlement.released, "4.00");
    await hold[Symbol.asyncDispose](); // already closed: nothing more
    assert.equal((await account.usage()).windowHeld, "0.00");
  });

  test("fromKey, audit, meAudit", async () => {
    const account = await make();
    await account.client().spend({ amount: "1.00", scope: W });
    const same = await AgentAccount.fromKey(account.key, { url: server.url });
    assert.equal(same.handle, account.handle);
    assert.equal(same.agent.usage.windowSpent, "1.00");
    const mine = await same.client().meAudit();
    assert.ok(mine.some((e) => e.outcome === "allowed" && e.amount === "1.00" && e.scope === W));
    const spend = mine.find((e) => e.action === "spend");
    assert.ok(spend?.reference?.startsWith("sp_"), JSON.stringify(spend));
    const created = mine.find((e) => e.action === "agent.create");
    assert.equal(created?.detail?.["by"], "admin");
    const admin = await account.audit({ limit: 50 });
    assert.ok(admin.length >= 2);
    assert.deepEqual(
      admin.map((e) => e.seq),
      [...admin.map((e) => e.seq)].sort((a, b) => a - b),
    );
    assert.ok(admin.every((e) => e.agent === account.handle && e.hash));
    const page = await account.audit({ limit: 1, after: admin[0].seq });
    assert.equal(page.length, 1);
    assert.equal(page[0].seq, admin[1].seq);
  });

  test("spawn a child, spend through it, revoke it with the parent's key", async () => {
    const parent = await make({ scopes: ["spawn:agents", W], spendingCap: "5.00" });
    const pc = parent.client();
    const child = await pc.spawn({ handle: uniqueHandle("child"), scopes: [W], spendingCap: "2.00", window: "1h" });
    assert.equal(child.agent.parent, parent.handle);
    const cc = child.client();
    await cc.spend({ amount: "1.50", scope: W });
    assert.equal((await parent.usage()).windowSpent, "1.50");
    assert.equal((await child.usage()).windowSpent, "1.50");
    const grandchild = await child.client().spawn({ handle: uniqueHandle("gc"), scopes: [W], spendingCap: "0.50" }).catch((e) => e);
    // the child has no spawn:agents scope
    assert.equal(grandchild.code, "scope_not_granted");
    assert.deepEqual(await child.revoke({ reason: "run over" }), [child.handle]);
    await assert.rejects(cc.spend({ amount: "0.10", scope: W }), CredentialRevoked);
    // idempotent
    assert.deepEqual(await pc.revoke(child.handle), [child.handle]);
  });

  test("revoking a parent revokes every descendant", async () => {
    const parent = await make({ scopes: ["spawn:agents", W], spendingCap: "5.00" });
    const a = await parent.client().spawn({ handle: uniqueHandle("a"), scopes: [W, "spawn:agents"], spendingCap: "1.00" });
    const b = await a.client().spawn({ handle: uniqueHandle("b"), scopes: [W], spendingCap: "1.00" });
    const revoked = await parent.revoke();
    assert.deepEqual(new Set(revoked), new Set([parent.handle, a.handle, b.handle]));
    await assert.rejects(b.client().spend({ amount: "0.10", scope: W }), CredentialRevoked);
  });

  test("suspend by an operator", async () => {
    const account = await make();
    assert.equal((await account.suspend({ reason: "look" })).status, "suspended");
    await assert.rejects(account.client().spend({ amount: "1.00", scope: W }), (e) => e.code === "agent_suspended");
    assert.equal((await account.resume()).status, "active");
  });

  test("resume after the breaker, rotateKey, update, list", async () => {
    const account = await make({ spendingCap: "1.00", breaker: { denials: 1, window: "60s" } });
    const client = account.client();
    await client.spend({ amount: "0.60", scope: W });
    await assert.rejects(client.spend({ amount: "0.60", scope: W }), (e) => e.code === "spending_cap_exceeded");
    await assert.rejects(client.spend({ amount: "0.10", scope: W }), (e) => e.code === "agent_suspended");
    assert.equal((await account.refresh()).status, "suspended");
    assert.equal((await account.resume()).status, "active");
    await client.spend({ amount: "0.40", scope: W });
    const oldKey = account.key;
    const newKey = await account.rotateKey();
    assert.notEqual(newKey, oldKey);
    assert.equal(account.key, newKey);
    await assert.rejects(client.me(), (e) => e.status === 401);
    assert.equal((await account.client().me()).handle, account.handle);
    const patched = await account.update({ spendingCap: 75, perTxLimit: "7.5", labels: { team: "x" } });
    assert.equal(patched.spendingCap, "75.00");
    assert.equal(patched.perTxLimit, "7.50");
    assert.deepEqual(patched.labels, { team: "x" });
    const all = await AgentAccount.list({ ...conn, limit: 1000 });
    assert.ok(all.some((a) => a.handle === account.handle && a.spendingCap === "75.00"));
  });

  test("baseUrl points at the gateway", () => {
    const client = new AgentClient("bk_test", { url: server.url + "/" });
    assert.equal(client.baseUrl("openai"), `${server.url}/proxy/openai`);
    assert.equal(client.key, "bk_test");
    assert.throws(() => new AgentClient(""), TypeError);
  });
});
