// The contract's TypeScript paragraph, as written; and the same package through require().
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import { AgentAccount, BulkheadError } from "bulkhead";
import { startServer, uniqueHandle } from "../support/server.mjs";

const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
let server;
const saved = {};

before(async () => {
  server = await startServer();
  for (const k of ["BULKHEAD_URL", "BULKHEAD_ADMIN_TOKEN"]) saved[k] = process.env[k];
  process.env.BULKHEAD_URL = server.url;
  process.env.BULKHEAD_ADMIN_TOKEN = server.adminToken;
});
after(async () => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  await server?.stop();
});

test("the quick start of the contract, with BULKHEAD_URL and BULKHEAD_ADMIN_TOKEN", async () => {
  const handle = uniqueHandle("invoice-processor-prod");
  const scope = "payments:write";
  const account = await AgentAccount.create({ handle, spendingCap: "50.00", perTxLimit: "5.00", window: "24h", scopes: [scope, "invoices:read"] });
  const client = account.client();
  const receipt = await client.spend({ amount: "2.50", scope });
  assert.equal(receipt.remaining, "47.50");
  const hold = await client.hold({ amount: "1.00", scope });
  assert.equal((await hold.capture("0.40")).released, "0.60");
  assert.deepEqual(await account.revoke(), [handle]);
  const err = await client.spend({ amount: "1.00", scope }).catch((e) => e);
  assert.ok(err instanceof BulkheadError);
  assert.deepEqual([err.status, err.code], [401, "credential_revoked"]);
});

test("require() of the package folder works too (a CommonJS build)", async () => {
  const require = createRequire(import.meta.url);
  const cjs = require(PACKAGE_DIR);
  assert.equal(typeof cjs.AgentAccount.create, "function");
  assert.notEqual(cjs.AgentAccount, AgentAccount); // its own copy: do not mix the two in one program
  const account = await cjs.AgentAccount.create({ handle: uniqueHandle("cjs"), spendingCap: "1.00", scopes: ["payments:write"] });
  const client = account.client();
  assert.equal((await client.spend({ amount: 0.6, scope: "payments:write" })).remaining, "0.40");
  const err = await client.spend({ amount: "0.60", scope: "payments:write" }).catch((e) => e);
  assert.ok(err instanceof cjs.SpendingCapExceeded);
  assert.ok(err instanceof cjs.BulkheadError);
  assert.equal(err.code, "spending_cap_exceeded");
  assert.equal(typeof require(`${PACKAGE_DIR}/dist/cjs/mastra.js`).withRunAccount, "function");
});
