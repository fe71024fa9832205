/**
 * Typed answers of the API, in camelCase. Amounts stay decimal strings (`"2.50"`); times are
 * RFC 3339 strings as the server wrote them. `raw` keeps the whole JSON object.
 *
 * @module
 */

import { answerAmount, optionalAmount } from "./amounts.js";

/** A JSON object as the server sent it. */
export type Json = Record<string, unknown>;

/** An agent's request rate limit: at most `requests` per `per` (a duration like `"1m"`). */
export interface RateLimit {
  requests: number;
  per: string;
}

/** An agent's usage, its descendants' spends and holds included. */
export interface Usage {
  windowSpent: string;
  windowHeld: string;
  windowStartedAt: string | null;
  windowResetsAt: string | null;
  lifetimeSpent: string;
  /** `(windowSpent + windowHeld) / spendingCap`, 0..1. */
  utilization: number;
  /** The agent's own decisions (allowed). */
  txCount: number;
  /** The agent's own denied decisions. */
  deniedCount: number;
}

/** An agent as the API describes it (`GET /v1/me`, `GET /v1/agents/{handle}`). */
export interface Agent {
  handle: string;
  parent: string | null;
  /** `"active"`, `"suspended"` or `"revoked"`. */
  status: string;
  scopes: string[];
  spendingCap: string;
  window: string;
  perTxLimit: string | null;
  lifetimeCap: string | null;
  rateLimit: RateLimit | null;
  createdAt: string | null;
  revokedAt: string | null;
  expiresAt: string | null;
  suspendedAt: string | null;
  labels: Record<string, string>;
  enforce: boolean;
  breaker: Json | null;
  usage: Usage | null;
  raw: Json;
}

/** An allowed spend (`POST /v1/spend`). */
export interface Receipt {
  id: string;
  amount: string;
  /** What is left of the window cap after this spend. */
  remaining: string | null;
  /** What is left of the lifetime cap (`null` without one). */
  remainingLifetime: string | null;
  windowResetsAt: string | null;
  /** True when the server answered from its idempotency record (the spend was made once, earlier). */
  replayed: boolean;
  /** For a shadow agent (`enforce: false`): the limit this spend would have broken. */
  shadowDenied: string | null;
  raw: Json;
}

/** How a hold was closed: `captured` was charged, `released` went back to the caps. */
export interface Settlement {
  id: string;
  captured: string;
  released: string;
  replayed: boolean;
  raw: Json;
}

/** One event of an agent's hash-chained audit trail. */
export interface AuditEvent {
  seq: number;
  at: string | null;
  agent: string;
  action: string;
  /** `"allowed"` or `"denied"`. */
  outcome: string;
  reason: string | null;
  scope: string | null;
  amount: string | null;
  hash: string;
  prevHash: string | null;
  /** The spend, hold or agent the event is about (`ref` in the JSON). */
  reference: string | null;
  /**
   * What else the event records (e.g. `{by: "gateway"}`, a shadow agent's
   * `{shadow: "would_deny"}`, a refused MCP call's `{mcp_server, tool}`).
   */
  detail: Json | null;
  raw: Json;
}

function record(value: unknown): Json {
  return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Json) : {};
}

function str(value: unknown): string | null {
  return typeof value === "string" ? value : null;
}

/** @internal */
export function toUsage(value: unknown): Usage | null {
  if (typeof value !== "object" || value === null) return null;
  const u = record(value);
  return {
    windowSpent: answerAmount(u["window_spent"] ?? "0"),
    windowHeld: answerAmount(u["window_held"] ?? "0"),
    windowStartedAt: str(u["window_started_at"]),
    windowResetsAt: str(u["window_resets_at"]),
    lifetimeSpent: answerAmount(u["lifetime_spent"] ?? "0"),
    utilization: Number(u["utilization"] ?? 0),
    txCount: Number(u["tx_count"] ?? 0),
    deniedCount: Number(u["denied_count"] ?? 0),
  };
}

/** @internal */
export function toAgent(value: unknown): Agent {
  const a = record(value);
  const rl = a["rate_limit"];
  const labels = record(a["labels"]);
  return {
    handle: String(a["handle"]),
    parent: str(a["parent"]),
    status: str(a["status"]) ?? "active",
    scopes: Array.isArray(a["scopes"]) ? a["scopes"].map(String) : [],
    spendingCap: answerAmount(a["spending_cap"]),
    window: str(a["window"]) ?? "",
    perTxLimit: optionalAmount(a["per_tx_limit"]),
    lifetimeCap: optionalAmount(a["lifetime_cap"]),
    rateLimit:
      typeof rl === "object" && rl !== null
        ? { requests: Number(record(rl)["requests"]), per: String(record(rl)["per"]) }
        : null,
    createdAt: str(a["created_at"]),
    revokedAt: str(a["revoked_at"]),
    expiresAt: str(a["expires_at"]),
    suspendedAt: str(a["suspended_at"]),
    labels: Object.fromEntries(Object.entries(labels).map(([k, v]) => [k, String(v)])),
    enforce: a["enforce"] === undefined ? true : Boolean(a["enforce"]),
    breaker: typeof a["breaker"] === "object" && a["breaker"] !== null ? record(a["breaker"]) : null,
    usage: toUsage(a["usage"]),
    raw: a,
  };
}

/** @internal */
export function toReceipt(value: unknown, replayed: boolean): Receipt {
  const r = record(value);
  const rem = record(r["remaining"]);
  return {
    id: String(r["id"]),
    amount: answerAmount(r["amount"]),
    remaining: optionalAmount(rem["window"]),
    remainingLifetime: optionalAmount(rem["lifetime"]),
    windowResetsAt: str(r["window_resets_at"]),
    replayed,
    shadowDenied: str(r["shadow_denied"]),
    raw: r,
  };
}

/** @internal */
export function toSettlement(value: unknown, replayed: boolean): Settlement {
  const s = record(value);
  return {
    id: String(s["id"]),
    captured: answerAmount(s["captured"] ?? "0.00"),
    released: answerAmount(s["released"] ?? "0.00"),
    replayed,
    raw: s,
  };
}

/** @internal */
export function toAuditEvent(value: unknown): AuditEvent {
  const e = record(value);
  return {
    seq: Number(e["seq"]),
    at: str(e["at"]),
    agent: String(e["agent"] ?? ""),
    action: String(e["action"] ?? ""),
    outcome: String(e["outcome"] ?? ""),
    reason: str(e["reason"]),
    scope: str(e["scope"]),
    amount: optionalAmount(e["amount"]),
    hash: String(e["hash"] ?? ""),
    prevHash: str(e["prev_hash"]),
    reference: str(e["ref"]),
    detail: typeof e["detail"] === "object" && e["detail"] !== null && !Array.isArray(e["detail"]) ? (e["detail"] as Json) : null,
    raw: e,
  };
}
