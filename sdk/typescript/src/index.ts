/**
 * Bulkhead: a bulkhead around every AI agent. Each agent gets its own key, hard spending caps,
 * explicit scopes, surgical revocation and a per-agent audit trail. This is the agent SDK:
 *
 * ```ts
 * import { AgentAccount, BulkheadError } from "bulkhead";
 *
 * const account = await AgentAccount.create({
 *   handle: "invoice-processor-prod-01",
 *   spendingCap: "50.00", perTxLimit: "5.00", window: "24h",
 *   scopes: ["payments:write", "invoices:read"] });
 * const client = account.client();
 * await client.spend({ amount: "2.50", scope: "payments:write" });
 * const hold = await client.hold({ amount: "1.00", scope: "payments:write" });
 * await hold.capture("0.40");
 * await account.revoke();
 * ```
 *
 * @packageDocumentation
 */

export { type Amount, MAX_DECIMALS, amountText, fromMicros, toMicros } from "./amounts.js";
export {
  AgentAccount,
  AgentClient,
  Hold,
  type AccountOptions,
  type AgentPatch,
  type AgentSpec,
  type CallOptions,
  type CreateAgentOptions,
  type HoldRequest,
  type MoneyCallOptions,
  type Page,
  type SpendRequest,
} from "./client.js";
export * from "./errors.js";
export type { Agent, AuditEvent, Json, RateLimit, Receipt, Settlement, Usage } from "./models.js";
export {
  type ConnectionOptions,
  DEFAULT_MAX_RETRIES,
  DEFAULT_TIMEOUT_MS,
  DEFAULT_URL,
  VERSION,
} from "./transport.js";
