// Every error code the server produces, thrown as its own class by a real request.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import * as bulkhead from "bulkhead";
import {
  AgentAccount,
  AgentClient,
  AgentSuspended,
  AncestorCapExceeded,
  AuthenticationError,
  BulkheadConnectionError,
  BulkheadError,
  CapEscalation,
  Conflict,
  CredentialExpired,
  CredentialRevoked,
  HandleTaken,
  HoldClosed,
  IdempotencyKeyReused,
  InvalidAmount,
  InvalidCredentials,
  InvalidHandle,
  InvalidRequest,
  InvalidScope,
  InvalidWindow,
  LifetimeCapExceeded,
  LimitExceeded,
  NotFound,
  PerTxLimitExceeded,
  PermissionDenied,
  RateLimited,
  ScopeEscalation,
  ScopeNotGranted,
  SpendingCapExceeded,
  errorClass,
  errorFromResponse,
} from "bulkhead";
import { startServer, uniqueHandle, waitFor } from "../support/server.mjs";

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
  return AgentAccount.create({ handle: uniqueHandle(), scopes: [W], spendingCap: "10.00", ...conn, ...fields });
}

/** `promise` rejects with exactly `cls`, with that status and code, a message and the raw body. */
async function expect(promise, cls, status, code) {
  let err;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  assert.ok(err, `expected ${cls.name}`);
  assert.equal(err.constructor, cls, `${err}`);
  assert.ok(err instanceof BulkheadError);
  assert.ok(err instanceof Error);
  assert.equal(err.status, status);
  assert.equal(err.code, code);
  assert.equal(err.name, cls.name);
  assert.ok(err.message.length > 0);
  assert.equal(err.body.error.code, code);
  assert.ok(err.raw.includes(code));
  assert.ok(String(err).includes(code));
  return err;
}

describe("400", () => {
  test("invalid_request", async () => {
    await expect(make({ extra: { no_such_field: 1 } }), InvalidRequest, 400, "invalid_request");
  });
  test("invalid_amount", async () => {
    const client = (await make()).client();
    const e = await expect(client.spend({ amount: "0", scope: W }), InvalidAmount, 400, "invalid_amount");
    assert.ok(e instanceof InvalidRequest);
    await expect(client.spend({ amount: "1000000000001", scope: W }), InvalidAmount, 400, "invalid_amount");
    const hold = await client.hold({ amount: "1.00", scope: W });
    await expect(hold.capture("1.01"), InvalidAmount, 400, "invalid_amount");
  });
  test("invalid_scope", async () => {
    const client = (await make()).client();
    await expect(client.spend({ amount: "1.00", scope: "Not A Scope" }), InvalidScope, 400, "invalid_scope");
  });
  test("invalid_handle", async () => {
    await expect(make({ handle: "-Bad Handle" }), InvalidHandle, 400, "invalid_handle");
  });
  test("invalid_window", async () => {
    await expect(make({ window: "3 weeks" }), InvalidWindow, 400, "invalid_window");
  });
});

describe("401", () => {
  test("invalid_credentials", async () => {
    const client = new AgentClient("bk_" + "x".repeat(40), { url: server.url });
    const e = await expect(client.spend({ amount: "1.00", scope: W }), InvalidCredentials, 401, "invalid_credentials");
    assert.ok(e instanceof AuthenticationError);
    await expect(
      AgentAccount.create({ handle: uniqueHandle(), scopes: [W], spendingCap: "1", url: server.url, adminToken: "not-the-token".repeat(4) }),
      InvalidCredentials,
      401,
      "invalid_credentials",
    );
  });
  test("credential_revoked", async () => {
    const account = await make();
    const client = account.client();
    await client.spend({ amount: "1.00", scope: W });
    assert.deepEqual(await account.revoke(), [account.handle]);
    await expect(client.spend({ amount: "1.00", scope: W }), CredentialRevoked, 401, "credential_revoked");
  });
  test("credential_expired", async () => {
    const account = await make({ expiresIn: "1s" });
    const client = account.client();
    assert.ok(account.agent.expiresAt);
    await waitFor(
      async () => {
        try {
          await client.me();
          return false;
        } catch (e) {
          if (e instanceof CredentialExpired) return true;
          throw e;
        }
      },
      { timeoutMs: 10_000, intervalMs: 100, what: "the key to expire" },
    );
    assert.ok(Date.now() >= Date.parse(account.agent.expiresAt));
    await expect(client.spend({ amount: "1.00", scope: W }), CredentialExpired, 401, "credential_expired");
  });
});

describe("402: nothing charged", () => {
  test("per_tx_limit_exceeded", async () => {
    const account = await make({ perTxLimit: "2.00" });
    const e = await expect(account.client().spend({ amount: "2.01", scope: W }), PerTxLimitExceeded, 402, "per_tx_limit_exceeded");
    assert.ok(e instanceof LimitExceeded);
    assert.equal((await account.usage()).windowSpent, "0.00");
  });
  test("spending_cap_exceeded", async () => {
    const account = await make({ spendingCap: "5.00", window: "1h" });
    const client = account.client();
    await client.spend({ amount: "4.00", scope: W });
    await expect(client.spend({ amount: "1.01", scope: W }), SpendingCapExceeded, 402, "spending_cap_exceeded");
    await expect(client.hold({ amount: "1.01", scope: W }), SpendingCapExceeded, 402, "spending_cap_exceeded");
    assert.equal((await account.usage()).windowSpent, "4.00");
    assert.equal((await account.usage()).windowHeld, "0.00");
  });
  test("lifetime_cap_exceeded", async () => {
    const account = await make({ lifetimeCap: "3.00" });
    const client = account.client();
    await client.spend({ amount: "2.50", scope: W });
    await expect(client.spend({ amount: "1.00", scope: W }), LifetimeCapExceeded, 402, "lifetime_cap_exceeded");
    assert.equal((await account.usage()).lifetimeSpent, "2.50");
  });
  test("ancestor_cap_exceeded", async () => {
    const parent = await make({ scopes: ["spawn:agents", W], spendingCap: "5.00" });
    const pc = parent.client();
    const child = await pc.spawn({ handle: uniqueHandle("child"), scopes: [W], spendingCap: "5.00" });
    await pc.spend({ amount: "4.00", scope: W });
    await expect(child.client().spend({ amount: "2.00", scope: W }), AncestorCapExceeded, 402, "ancestor_cap_exceeded");
    assert.equal((await child.usage()).windowSpent, "0.00");
  });
  test("a 402 from the server carries remaining, window_resets_at and Retry-After", async () => {
    const account = await make({ spendingCap: "5.00", window: "1h", lifetimeCap: "9.00" });
    const client = account.client();
    await client.spend({ amount: "4.00", scope: W });
    const e = await client.spend({ amount: "1.01", scope: W }).catch((x) => x);
    assert.equal(e.code, "spending_cap_exceeded");
    assert.equal(e.remaining, "1.00");
    assert.equal(e.remainingLifetime, "5.00");
    assert.ok(e.windowResetsAt);
    assert.ok(e.retryAfter > 0 && e.retryAfter <= 3600);
  });
  test("remaining, window_resets_at and Retry-After are read exactly from a 402 answer", () => {
    const body = JSON.stringify({
      error: { code: "spending_cap_exceeded", message: "Over." },
      remaining: { window: "1.000001", lifetime: null },
      window_resets_at: "2026-12-05T04:00:00Z",
    });
    const e = errorFromResponse(402, new Headers({ "Retry-After": "1800" }), body);
    assert.equal(e.constructor, SpendingCapExceeded);
    assert.equal(e.remaining, "1.000001");
    assert.equal(e.remainingLifetime, null);
    assert.equal(e.windowResetsAt, "2026-12-05T04:00:00Z");
    assert.equal(e.retryAfter, 1800);
  });
});

describe("403", () => {
  test("scope_not_granted", async () => {
    const client = (await make({ scopes: ["invoices:read"] })).client();
    const e = await expect(client.spend({ amount: "1.00", scope: W }), ScopeNotGranted, 403, "scope_not_granted");
    assert.ok(e instanceof PermissionDenied);
  });
  test("scope_escalation", async () => {
    const client = (await make({ scopes: ["spawn:agents", W], spendingCap: "5.00" })).client();
    await expect(
      client.spawn({ handle: uniqueHandle("child"), scopes: ["payments:refund"], spendingCap: "1.00" }),
      ScopeEscalation,
      403,
      "scope_escalation",
    );
  });
  test("cap_escalation", async () => {
    const client = (await make({ scopes: ["spawn:agents", W], spendingCap: "5.00" })).client();
    await expect(client.spawn({ handle: uniqueHandle("child"), scopes: [W], spendingCap: "5.01" }), CapEscalation, 403, "cap_escalation");
  });
  test("agent_suspended by the breaker", async () => {
    const account = await make({ spendingCap: "1.00", breaker: { denials: 2, window: "60s" } });
    const client = account.client();
    await client.spend({ amount: "0.60", scope: W });
    for (let i = 0; i < 2; i++) {
      await assert.rejects(client.spend({ amount: "0.60", scope: W }), SpendingCapExceeded);
    }
    await expect(client.spend({ amount: "0.10", scope: W }), AgentSuspended, 403, "agent_suspended");
    assert.equal((await account.refresh()).status, "suspended");
  });
});

describe("404, 409, 422, 429", () => {
  test("not_found", async () => {
    const client = (await make()).client();
    await expect(client.capture("hold_doesnotexist0000000000", "1.00"), NotFound, 404, "not_found");
    await expect(new AgentAccount(uniqueHandle("ghost"), conn).refresh(), NotFound, 404, "not_found");
  });
  test("handle_taken", async () => {
    const account = await make();
    const e = await expect(make({ handle: account.handle }), HandleTaken, 409, "handle_taken");
    assert.ok(e instanceof Conflict);
  });
  test("hold_closed", async () => {
    const client = (await make()).client();
    const hold = await client.hold({ amount: "1.00", scope: W });
    await hold.release();
    await expect(hold.capture("0.50"), HoldClosed, 409, "hold_closed");
  });
  test("idempotency_key_reused, and the replay of the same call", async () => {
    const account = await make();
    const client = account.client();
    const first = await client.spend({ amount: "1.00", scope: W, idempotencyKey: "order-17" });
    const again = await client.spend({ amount: "1.00", scope: W, idempotencyKey: "order-17" });
    assert.equal(first.replayed, false);
    assert.equal(again.id, first.id);
    assert.equal(again.replayed, true);
    await expect(client.spend({ amount: "2.00", scope: W, idempotencyKey: "order-17" }), IdempotencyKeyReused, 422, "idempotency_key_reused");
    assert.equal((await account.usage()).windowSpent, "1.00");
    await assert.rejects(client.spend({ amount: "1.00", scope: W, idempotencyKey: "has space" }), RangeError);
    await assert.rejects(client.spend({ amount: "1.00", scope: W, idempotencyKey: "x".repeat(256) }), RangeError);
  });
  test("rate_limited, with retryAfter", async () => {
    const account = await make({ rateLimit: { requests: 2, per: "1m" } });
    const client = account.client();
    await client.spend({ amount: "0.10", scope: W });
    await client.spend({ amount: "0.10", scope: W });
    const e = await expect(client.spend({ amount: "0.10", scope: W }), RateLimited, 429, "rate_limited");
    assert.ok(e.retryAfter !== null && e.retryAfter > 0 && e.retryAfter <= 60, `retryAfter ${e.retryAfter}`);
    assert.equal((await account.usage()).windowSpent, "0.20");
  });
});

describe("no answer, and the table", () => {
  test("no server is a connection error", async () => {
    const client = new AgentClient("bk_x", { url: "http://127.0.0.1:9", maxRetries: 1 });
    const e = await client.spend({ amount: "1.00", scope: W }).catch((x) => x);
    assert.ok(e instanceof BulkheadConnectionError);
    assert.equal(e.status, null);
    assert.equal(e.code, "connection_error");
    assert.match(e.message, /2 attempt/);
  });

  test("a timeout is enforced per attempt", async () => {
    const net = await import("node:net");
    const silent = net.createServer(() => {}); // accepts, never answers
    await new Promise((r) => silent.listen(0, "127.0.0.1", r));
    const client = new AgentClient("bk_x", { url: `http://127.0.0.1:${silent.address().port}`, timeout: 100, maxRetries: 1 });
    const started = Date.now();
    const e = await client.me().catch((x) => x);
    silent.close();
    assert.ok(e instanceof BulkheadConnectionError, String(e));
    assert.match(e.message, /TimeoutError/);
    assert.ok(Date.now() - started < 5_000);
  });

  const TABLE = [
    ["invalid_request", 400, "InvalidRequest", "InvalidRequest"],
    ["invalid_amount", 400, "InvalidAmount", "InvalidRequest"],
    ["invalid_scope", 400, "InvalidScope", "InvalidRequest"],
    ["invalid_handle", 400, "InvalidHandle", "InvalidRequest"],
    ["invalid_window", 400, "InvalidWindow", "InvalidRequest"],
    ["invalid_credentials", 401, "InvalidCredentials", "AuthenticationError"],
    ["credential_revoked", 401, "CredentialRevoked", "AuthenticationError"],
    ["credential_expired", 401, "CredentialExpired", "AuthenticationError"],
    ["per_tx_limit_exceeded", 402, "PerTxLimitExceeded", "LimitExceeded"],
    ["spending_cap_exceeded", 402, "SpendingCapExceeded", "LimitExceeded"],
    ["lifetime_cap_exceeded", 402, "LifetimeCapExceeded", "LimitExceeded"],
    ["ancestor_cap_exceeded", 402, "AncestorCapExceeded", "LimitExceeded"],
    ["scope_not_granted", 403, "ScopeNotGranted", "PermissionDenied"],
    ["scope_escalation", 403, "ScopeEscalation", "PermissionDenied"],
    ["cap_escalation", 403, "CapEscalation", "PermissionDenied"],
    ["agent_suspended", 403, "AgentSuspended", "PermissionDenied"],
    ["route_not_allowed", 403, "RouteNotAllowed", "PermissionDenied"],
    ["not_found", 404, "NotFound", "NotFound"],
    ["method_not_allowed", 405, "MethodNotAllowed", "MethodNotAllowed"],
    ["handle_taken", 409, "HandleTaken", "Conflict"],
    ["hold_closed", 409, "HoldClosed", "Conflict"],
    ["agent_revoked", 409, "AgentRevoked", "Conflict"],
    ["idempotency_in_progress", 409, "IdempotencyInProgress", "Conflict"],
    ["body_too_large", 413, "BodyTooLarge", "BodyTooLarge"],
    ["idempotency_key_reused", 422, "IdempotencyKeyReused", "UnprocessableRequest"],
    ["rate_limited", 429, "RateLimited", "RateLimited"],
    ["internal_error", 500, "InternalError", "ServerError"],
    ["upstream_unavailable", 502, "UpstreamUnavailable", "ServerError"],
    ["store_unavailable", 503, "StoreUnavailable", "ServerError"],
    ["upstream_timeout", 504, "UpstreamTimeout", "ServerError"],
  ];
  for (const [code, status, name, base] of TABLE) {
    test(`${code} → ${name}`, () => {
      const body = JSON.stringify({ error: { code, message: `about ${code}.` } });
      const err = errorFromResponse(status, new Headers({ "retry-after": "7" }), body);
      assert.equal(err.constructor, bulkhead[name]);
      assert.ok(err instanceof bulkhead[base]);
      assert.equal(errorClass(status, code), bulkhead[name]);
      assert.deepEqual([err.status, err.code, err.message, err.retryAfter], [status, code, `about ${code}.`, 7]);
    });
  }
  test("an unknown code maps to the base class of its status; a body that is not JSON still throws", () => {
    for (const [status, base] of [[400, "InvalidRequest"], [401, "AuthenticationError"], [402, "LimitExceeded"], [403, "PermissionDenied"], [409, "Conflict"], [500, "ServerError"], [418, "BulkheadError"]]) {
      const err = errorFromResponse(status, new Headers(), '{"error": {"code": "brand_new_code", "message": "New."}}');
      assert.equal(err.constructor, bulkhead[base]);
      assert.equal(err.code, "brand_new_code");
    }
    const err = errorFromResponse(502, new Headers(), "<html>bad gateway</html>");
    assert.equal(err.constructor, bulkhead.ServerError);
    assert.equal(err.code, "http_502");
    assert.equal(err.body, null);
    assert.match(err.message, /bad gateway/);
  });
});
