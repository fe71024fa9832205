/**
 * Errors: one class per error code of the API, grouped under a base class per status.
 *
 * Every non-2xx answer throws a subclass of {@link BulkheadError} carrying the answer's
 * `status`, `code` and `message`, and `remaining` and `retryAfter` when the answer has them. A
 * code this SDK does not know still maps to the base class of its status.
 *
 * @module
 */

import { optionalAmount } from "./amounts.js";

/** The fields of a {@link BulkheadError}. */
export interface BulkheadErrorInit {
  /** The HTTP status, `null` when no answer arrived. */
  status?: number | null;
  /** The answer's `error.code`, e.g. `"spending_cap_exceeded"`. */
  code?: string;
  /** What is left of the window cap, when the answer says. */
  remaining?: string | null;
  /** What is left of the lifetime cap, when the answer says. */
  remainingLifetime?: string | null;
  /** When the window cap resets (RFC 3339), when the answer says. */
  windowResetsAt?: string | null;
  /** Seconds to wait before trying again (`Retry-After`), when the answer says. */
  retryAfter?: number | null;
  /** The parsed JSON body (`null` if it was not JSON). */
  body?: unknown;
  /** The body as text. */
  raw?: string;
  /** The underlying error (for connection errors). */
  cause?: unknown;
}

/**
 * An error answer of the Bulkhead API (or, for {@link BulkheadConnectionError}, no answer at all).
 *
 * ```ts
 * try {
 *   await client.spend({ amount: "2.50", scope: "payments:write" });
 * } catch (e) {
 *   if (e instanceof SpendingCapExceeded) console.log(e.remaining, e.retryAfter);
 * }
 * ```
 */
export class BulkheadError extends Error {
  /** The HTTP status (`null` when no answer arrived). */
  readonly status: number | null;
  /** The `error.code` of the answer, e.g. `"spending_cap_exceeded"`. */
  readonly code: string;
  /** What is left of the window cap (a decimal string), when the answer says. */
  readonly remaining: string | null;
  /** What is left of the lifetime cap, when the answer says. */
  readonly remainingLifetime: string | null;
  /** When the window cap resets (RFC 3339), when the answer says. */
  readonly windowResetsAt: string | null;
  /** Seconds to wait before retrying (`Retry-After`), when the answer says. */
  readonly retryAfter: number | null;
  /** The parsed JSON body (`null` if the body was not JSON). */
  readonly body: unknown;
  /** The body as text. */
  readonly raw: string;

  /** Builds an error; {@link errorFromResponse} makes them from answers. */
  constructor(message: string, init: BulkheadErrorInit = {}) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.name = new.target.name;
    this.status = init.status ?? null;
    this.code = init.code ?? "error";
    this.remaining = init.remaining ?? null;
    this.remainingLifetime = init.remainingLifetime ?? null;
    this.windowResetsAt = init.windowResetsAt ?? null;
    this.retryAfter = init.retryAfter ?? null;
    this.body = init.body ?? null;
    this.raw = init.raw ?? "";
  }

  /** `Name: code (status): message`. */
  override toString(): string {
    const status = this.status === null ? "no answer" : String(this.status);
    return `${this.name}: ${this.code} (${status}): ${this.message}`;
  }
}

/**
 * The server could not be reached, or its answer was lost, even after the SDK's retries.
 *
 * `code` is `"connection_error"` and `status` is `null`. For a money call the outcome is
 * unknown: repeat it with the same `idempotencyKey` to learn it without paying twice.
 */
export class BulkheadConnectionError extends BulkheadError {}

/** 400: the request is malformed (also the base class of every other 400). */
export class InvalidRequest extends BulkheadError {}
/** 400 `invalid_amount`: not an amount, zero where a spend is meant, or above what is held. */
export class InvalidAmount extends InvalidRequest {}
/** 400 `invalid_scope`: a scope is not `resource:action` of the allowed characters. */
export class InvalidScope extends InvalidRequest {}
/** 400 `invalid_handle`: a handle is not 1–64 of `a-z 0-9 . _ -` starting with a letter or digit. */
export class InvalidHandle extends InvalidRequest {}
/** 400 `invalid_window`: a window or duration is not `<n>s|m|h|d`. */
export class InvalidWindow extends InvalidRequest {}

/** 401: the key (or admin token) was not accepted (base class of every 401). */
export class AuthenticationError extends BulkheadError {}
/** 401 `invalid_credentials`: missing, malformed or unknown key. */
export class InvalidCredentials extends AuthenticationError {}
/** 401 `credential_revoked`: the agent (or an ancestor) was revoked. */
export class CredentialRevoked extends AuthenticationError {}
/** 401 `credential_expired`: the agent's key expired. */
export class CredentialExpired extends AuthenticationError {}

/** 402: a spend or hold would break a limit; nothing was charged (base class of every 402). */
export class LimitExceeded extends BulkheadError {}
/** 402 `per_tx_limit_exceeded`. */
export class PerTxLimitExceeded extends LimitExceeded {}
/** 402 `spending_cap_exceeded`: the window cap; `retryAfter` is the time until it resets. */
export class SpendingCapExceeded extends LimitExceeded {}
/** 402 `lifetime_cap_exceeded`. */
export class LifetimeCapExceeded extends LimitExceeded {}
/** 402 `ancestor_cap_exceeded`: a cap of a parent (or further ancestor) would break. */
export class AncestorCapExceeded extends LimitExceeded {}

/** 403: not allowed (base class of every 403). */
export class PermissionDenied extends BulkheadError {}
/** 403 `scope_not_granted`: the key lacks the scope. */
export class ScopeNotGranted extends PermissionDenied {}
/** 403 `scope_escalation`: a child may not have scopes its parent lacks. */
export class ScopeEscalation extends PermissionDenied {}
/** 403 `cap_escalation`: a child's caps may not exceed its parent's. */
export class CapEscalation extends PermissionDenied {}
/** 403 `agent_suspended`: suspended by an operator or by the runaway-loop breaker. */
export class AgentSuspended extends PermissionDenied {}
/** 403 `route_not_allowed`: the gateway upstream does not allow that method and path. */
export class RouteNotAllowed extends PermissionDenied {}

/** 404 `not_found`: unknown agent, hold or route. */
export class NotFound extends BulkheadError {}
/** 405 `method_not_allowed`. */
export class MethodNotAllowed extends BulkheadError {}

/** 409: conflicts (base class of every 409). */
export class Conflict extends BulkheadError {}
/** 409 `handle_taken`. */
export class HandleTaken extends Conflict {}
/** 409 `hold_closed`: the hold was already captured, released or expired. */
export class HoldClosed extends Conflict {}
/** 409 `agent_revoked`: rotating or resuming a revoked agent. */
export class AgentRevoked extends Conflict {}
/** 409 `idempotency_in_progress`: the same key is still running (the SDK retries it). */
export class IdempotencyInProgress extends Conflict {}

/** 413 `body_too_large`. */
export class BodyTooLarge extends BulkheadError {}
/** 422 (base class of every 422). */
export class UnprocessableRequest extends BulkheadError {}
/** 422 `idempotency_key_reused`: the same idempotency key with a different body. */
export class IdempotencyKeyReused extends UnprocessableRequest {}
/** 429 `rate_limited`: the agent's request rate limit; `retryAfter` says when to try again. */
export class RateLimited extends BulkheadError {}

/** 5xx (base class of every server error). */
export class ServerError extends BulkheadError {}
/** 500 `internal_error`. */
export class InternalError extends ServerError {}
/** 502 `upstream_unavailable` (gateway). */
export class UpstreamUnavailable extends ServerError {}
/** 503 `store_unavailable` (the SDK retries it). */
export class StoreUnavailable extends ServerError {}
/** 504 `upstream_timeout` (gateway). */
export class UpstreamTimeout extends ServerError {}

type ErrorClass = new (message: string, init?: BulkheadErrorInit) => BulkheadError;

const BY_CODE: Readonly<Record<string, ErrorClass>> = {
  invalid_request: InvalidRequest,
  invalid_amount: InvalidAmount,
  invalid_scope: InvalidScope,
  invalid_handle: InvalidHandle,
  invalid_window: InvalidWindow,
  invalid_credentials: InvalidCredentials,
  credential_revoked: CredentialRevoked,
  credential_expired: CredentialExpired,
  per_tx_limit_exceeded: PerTxLimitExceeded,
  spending_cap_exceeded: SpendingCapExceeded,
  lifetime_cap_exceeded: LifetimeCapExceeded,
  ancestor_cap_exceeded: AncestorCapExceeded,
  scope_not_granted: ScopeNotGranted,
  scope_escalation: ScopeEscalation,
  cap_escalation: CapEscalation,
  agent_suspended: AgentSuspended,
  route_not_allowed: RouteNotAllowed,
  not_found: NotFound,
  method_not_allowed: MethodNotAllowed,
  handle_taken: HandleTaken,
  hold_closed: HoldClosed,
  agent_revoked: AgentRevoked,
  idempotency_in_progress: IdempotencyInProgress,
  body_too_large: BodyTooLarge,
  idempotency_key_reused: IdempotencyKeyReused,
  rate_limited: RateLimited,
  internal_error: InternalError,
  upstream_unavailable: UpstreamUnavailable,
  store_unavailable: StoreUnavailable,
  upstream_timeout: UpstreamTimeout,
};

const BY_STATUS: Readonly<Record<number, ErrorClass>> = {
  400: InvalidRequest,
  401: AuthenticationError,
  402: LimitExceeded,
  403: PermissionDenied,
  404: NotFound,
  405: MethodNotAllowed,
  409: Conflict,
  413: BodyTooLarge,
  422: UnprocessableRequest,
  429: RateLimited,
};

/** The error class for an answer's status and code: by code, else by status. */
export function errorClass(status: number, code: string | null | undefined): ErrorClass {
  if (code && Object.hasOwn(BY_CODE, code)) return BY_CODE[code]!;
  const byStatus = BY_STATUS[status];
  if (byStatus) return byStatus;
  return status >= 500 ? ServerError : BulkheadError;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or `null`. */
export function parseRetryAfter(value: string | null): number | null {
  if (value === null || value.trim() === "") return null;
  const seconds = Number(value.trim());
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const at = Date.parse(value);
  return Number.isNaN(at) ? null : Math.max(0, (at - Date.now()) / 1000);
}

/**
 * The error for a non-2xx answer: its class by code (else status), its fields from the body.
 *
 * @param status - the HTTP status.
 * @param headers - the answer's headers (`Retry-After` is read).
 * @param text - the body as text.
 */
export function errorFromResponse(status: number, headers: Headers, text: string): BulkheadError {
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  const error = isRecord(body) && isRecord(body["error"]) ? body["error"] : {};
  const code = typeof error["code"] === "string" ? error["code"] : null;
  let message = typeof error["message"] === "string" ? error["message"] : "";
  if (!message) message = text.trim().slice(0, 200) || `HTTP ${status}`;
  // `remaining` may sit at the top level (the contract's 402 body) or inside `error`.
  const top = isRecord(body) ? body : {};
  const remainingObj = isRecord(top["remaining"]) ? top["remaining"] : isRecord(error["remaining"]) ? error["remaining"] : null;
  const resets = top["window_resets_at"] ?? error["window_resets_at"];
  const Cls = errorClass(status, code);
  return new Cls(message, {
    status,
    code: code ?? `http_${status}`,
    remaining: remainingObj ? optionalAmount(remainingObj["window"]) : null,
    remainingLifetime: remainingObj ? optionalAmount(remainingObj["lifetime"]) : null,
    windowResetsAt: typeof resets === "string" ? resets : null,
    retryAfter:
      parseRetryAfter(headers.get("retry-after")) ??
      (typeof error["retry_after"] === "number" ? Math.max(0, error["retry_after"]) : null),
    body,
    raw: text,
  });
}
