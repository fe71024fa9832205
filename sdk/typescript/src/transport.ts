/**
 * Requests with bounded retries over the global `fetch`.
 *
 * @module
 * @internal
 */

import { randomUUID } from "node:crypto";
import { BulkheadConnectionError, BulkheadError, errorFromResponse, parseRetryAfter } from "./errors.js";

/** The SDK's version, sent in `User-Agent`. */
export const VERSION = "0.1.0";
/** The server when neither `url` nor `BULKHEAD_URL` says otherwise. */
export const DEFAULT_URL = "http://127.0.0.1:8080";
/** Milliseconds each attempt of a request may take (default). */
export const DEFAULT_TIMEOUT_MS = 30_000;
/** How many times a failed request may be repeated (default). */
export const DEFAULT_MAX_RETRIES = 4;
const BACKOFF_BASE_MS = 50;
const BACKOFF_MAX_MS = 2_000;

/** Options every client and account accepts. */
export interface ConnectionOptions {
  /** The server, else `BULKHEAD_URL`, else `http://127.0.0.1:8080`. */
  url?: string;
  /** Milliseconds each attempt may take (default 30 000), enforced with `AbortSignal.timeout`. */
  timeout?: number;
  /** How many times a failed request may be repeated (default 4). */
  maxRetries?: number;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
}

/** Which failures a request may be repeated after. */
export type Retry =
  /** Only when the request surely never left (no connection could be made): a create. */
  | "connect"
  /** After any transport failure or a 503: reads and idempotent calls (revocation). */
  | "safe"
  /** A money call carrying an idempotency key: as "safe", and after `idempotency_in_progress`. */
  | "money";

/** One logical request: the same bytes (and idempotency key) on every attempt. */
export interface Call {
  method: string;
  path: string;
  token: string | null;
  body?: unknown;
  retry?: Retry;
  idempotencyKey?: string;
  query?: Record<string, string | number | undefined>;
  signal?: AbortSignal;
}

/** A 2xx answer: its JSON and whether the server replayed it from its idempotency record. */
export interface Answer {
  status: number;
  data: unknown;
  replayed: boolean;
}

/** `url`, else `BULKHEAD_URL`, else the default, without a trailing slash. */
export function resolveUrl(url?: string): string {
  const value = url || process.env["BULKHEAD_URL"] || DEFAULT_URL;
  return value.replace(/\/+$/, "");
}

/** `token`, else `BULKHEAD_ADMIN_TOKEN`, else `null`. */
export function resolveAdminToken(token?: string | null): string | null {
  return token || process.env["BULKHEAD_ADMIN_TOKEN"] || null;
}

/** A fresh idempotency key for one logical money call. */
export function newIdempotencyKey(): string {
  return `bk-ts-${randomUUID()}`;
}

/** The caller's idempotency key, checked, or a fresh one. */
export function moneyKey(key: string | undefined): string {
  if (key === undefined) return newIdempotencyKey();
  if (typeof key !== "string" || key.length < 1 || key.length > 255) {
    throw new RangeError("idempotencyKey must be a string of 1 to 255 characters");
  }
  if (!/^[\x21-\x7e]+$/.test(key)) {
    throw new RangeError("idempotencyKey must be visible ASCII characters (no spaces)");
  }
  return key;
}

const NOT_SENT = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EADDRNOTAVAIL",
  "UND_ERR_CONNECT_TIMEOUT",
]);

function causeCode(err: unknown): string | null {
  let e: unknown = err;
  for (let i = 0; i < 4 && typeof e === "object" && e !== null; i++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string") return code;
    e = (e as { cause?: unknown }).cause;
  }
  return null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Milliseconds before retry number `attempt` (0-based): exponential with jitter, bounded. */
export function backoffMs(attempt: number, retryAfterSeconds: number | null = null): number {
  if (retryAfterSeconds !== null) return Math.min(Math.max(retryAfterSeconds * 1000, 0), BACKOFF_MAX_MS);
  const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return delay * (0.5 + Math.random() / 2);
}

/** Sends {@link Call}s to one server, retrying what each call's kind allows. */
export class Transport {
  readonly url: string;
  readonly timeout: number;
  readonly maxRetries: number;
  readonly #fetch: typeof fetch;

  constructor(options: ConnectionOptions = {}) {
    const maxRetries = options.maxRetries ?? DEFAULT_MAX_RETRIES;
    if (!Number.isInteger(maxRetries) || maxRetries < 0) throw new RangeError("maxRetries must be an integer ≥ 0");
    const timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    if (!(timeout > 0)) throw new RangeError("timeout must be a positive number of milliseconds");
    this.url = resolveUrl(options.url);
    this.timeout = timeout;
    this.maxRetries = maxRetries;
    this.#fetch = options.fetch ?? globalThis.fetch;
  }

  /** The options this transport was made with, for a client made from an account. */
  options(): ConnectionOptions {
    return { url: this.url, timeout: this.timeout, maxRetries: this.maxRetries, fetch: this.#fetch };
  }

  /** The JSON of the 2xx answer to `call`, or the matching {@link BulkheadError}. */
  async json(call: Call): Promise<unknown> {
    return (await this.send(call)).data;
  }

  /** The 2xx answer to `call` after the retries its kind allows; any other answer throws. */
  async send(call: Call): Promise<Answer> {
    const retry = call.retry ?? "safe";
    const headers: Record<string, string> = {
      Accept: "application/json",
      "User-Agent": `bulkhead-typescript/${VERSION}`,
    };
    if (call.token !== null) headers["Authorization"] = `Bearer ${call.token}`;
    let body: string | undefined;
    if (call.body !== undefined) {
      body = JSON.stringify(call.body);
      headers["Content-Type"] = "application/json";
    }
    if (call.idempotencyKey !== undefined) headers["Idempotency-Key"] = call.idempotencyKey;
    let target = this.url + call.path;
    if (call.query) {
      const params = new URLSearchParams();
      for (const [k, v] of Object.entries(call.query)) if (v !== undefined) params.set(k, String(v));
      const qs = params.toString();
      if (qs) target += `?${qs}`;
    }
    for (let attempt = 0; ; attempt++) {
      call.signal?.throwIfAborted();
      const timeout = AbortSignal.timeout(this.timeout);
      const signal = call.signal ? AbortSignal.any([call.signal, timeout]) : timeout;
      let response: Response;
      let text: string;
      try {
        response = await this.#fetch(target, { method: call.method, headers, body, signal });
        text = await response.text();
      } catch (err) {
        if (call.signal?.aborted) throw err;
        const notSent = NOT_SENT.has(causeCode(err) ?? "");
        const mayRetry = retry === "connect" ? notSent : true;
        if (attempt < this.maxRetries && mayRetry) {
          await sleep(backoffMs(attempt));
          continue;
        }
        const what = retry === "money" ? "the outcome is unknown" : "nothing was answered";
        const reason = err instanceof Error ? `${err.name}: ${err.message}${causeCode(err) ? ` (${causeCode(err)})` : ""}` : String(err);
        throw new BulkheadConnectionError(
          `${call.method} ${call.path}: no answer after ${attempt + 1} attempt(s) (${reason}); ${what}`,
          { code: "connection_error", cause: err },
        );
      }
      if (response.ok) {
        let data: unknown = {};
        if (text) {
          try {
            data = JSON.parse(text);
          } catch {
            throw new BulkheadError(`the server answered ${response.status} with a body that is not JSON`, {
              status: response.status,
              code: "invalid_response",
              raw: text,
            });
          }
        }
        const replayed = (response.headers.get("idempotent-replayed") ?? "").toLowerCase() === "true";
        return { status: response.status, data, replayed };
      }
      const retryable =
        retry !== "connect" &&
        (response.status === 503 ||
          (retry === "money" && response.status === 409 && text.includes("idempotency_in_progress")));
      if (retryable && attempt < this.maxRetries) {
        await sleep(backoffMs(attempt, parseRetryAfter(response.headers.get("retry-after"))));
        continue;
      }
      throw errorFromResponse(response.status, response.headers, text);
    }
  }
}

/** A path segment, percent-encoded. */
export function segment(value: string): string {
  return encodeURIComponent(value);
}
