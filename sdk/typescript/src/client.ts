/**
 * `AgentClient` (an agent's key), `Hold` (money reserved) and `AgentAccount` (an agent to manage).
 *
 * @module
 */

import { type Amount, amountText } from "./amounts.js";
import { BulkheadError, HoldClosed } from "./errors.js";
import {
  type Agent,
  type AuditEvent,
  type Json,
  type RateLimit,
  type Receipt,
  type Settlement,
  type Usage,
  toAgent,
  toAuditEvent,
  toReceipt,
  toSettlement,
} from "./models.js";
import { type ConnectionOptions, Transport, moneyKey, resolveAdminToken, segment } from "./transport.js";

/** Per-call options of every request. */
export interface CallOptions {
  /** Aborts the call (and its retries). */
  signal?: AbortSignal;
}

/** Options of a money call. */
export interface MoneyCallOptions extends CallOptions {
  /**
   * The idempotency key (≤ 255 visible ASCII characters). Without one the SDK makes one for this
   * call; pass your own (an invoice number) so that a repeated call, even from another process,
   * charges once.
   */
  idempotencyKey?: string;
}

/** `client.spend(...)`. */
export interface SpendRequest extends MoneyCallOptions {
  /** How much: `"2.50"`, `2n` or `2.5`. */
  amount: Amount;
  /** The scope the spend is made under, e.g. `"payments:write"`. */
  scope: string;
  /** A note kept in the audit trail. */
  memo?: string;
}

/** `client.hold(...)`. */
export interface HoldRequest extends MoneyCallOptions {
  /** How much to reserve. */
  amount: Amount;
  /** The scope the hold is made under. */
  scope: string;
  /** When the hold releases itself if still open (default `"5m"`, at most `"24h"`). */
  expiresIn?: string;
}

/** The fields of a new agent (`POST /v1/agents`), in camelCase. */
export interface AgentSpec {
  /** 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit. */
  handle: string;
  /** What the key may do, e.g. `["payments:write", "invoices:read"]`. */
  scopes: string[];
  /** The most it may spend per window. */
  spendingCap: Amount;
  /** The cap's reset period (default `"24h"`), `<n>s|m|h|d`. */
  window?: string;
  /** The most one spend or hold may be (default: the spending cap). */
  perTxLimit?: Amount;
  /** The most it may ever spend (default: none). */
  lifetimeCap?: Amount;
  /** E.g. `{requests: 60, per: "1m"}`. */
  rateLimit?: RateLimit;
  /** When its key expires, e.g. `"30d"` (default: never). */
  expiresIn?: string;
  /** Free-form string labels. */
  labels?: Record<string, string>;
  /** The runaway-loop breaker's settings, e.g. `{denials: 10, window: "30s"}`. */
  breaker?: Json;
  /** Further fields of `POST /v1/agents`, sent as given. */
  extra?: Json;
}

/** `AgentAccount.create(...)`: an agent's fields, the server and the admin token. */
export interface CreateAgentOptions extends AgentSpec, ConnectionOptions {
  /** `false` makes a shadow agent whose limits are only recorded. */
  enforce?: boolean;
  /** The admin token, else `BULKHEAD_ADMIN_TOKEN`. */
  adminToken?: string;
}

/** What `account.update(...)` may change (`PATCH /v1/agents/{handle}`). */
export interface AgentPatch {
  scopes?: string[];
  spendingCap?: Amount;
  window?: string;
  perTxLimit?: Amount;
  lifetimeCap?: Amount | null;
  rateLimit?: RateLimit | null;
  labels?: Record<string, string>;
  breaker?: Json | null;
  enforce?: boolean;
  /** Further fields, sent as given. */
  extra?: Json;
}

/** Paging of a list call. */
export interface Page {
  /** At most this many (default 100). */
  limit?: number;
  /** The last `seq` (events) or handle (agents) seen. */
  after?: string | number;
}

function agentBody(spec: AgentSpec & { enforce?: boolean }): Json {
  if (typeof spec.handle !== "string") throw new TypeError("handle must be a string");
  if (!Array.isArray(spec.scopes)) throw new TypeError("scopes must be an array of strings");
  const body: Json = {
    handle: spec.handle,
    scopes: [...spec.scopes],
    spending_cap: amountText(spec.spendingCap, "spendingCap"),
  };
  if (spec.window !== undefined) body["window"] = spec.window;
  if (spec.perTxLimit !== undefined) body["per_tx_limit"] = amountText(spec.perTxLimit, "perTxLimit");
  if (spec.lifetimeCap !== undefined) body["lifetime_cap"] = amountText(spec.lifetimeCap, "lifetimeCap");
  if (spec.rateLimit !== undefined) body["rate_limit"] = { requests: spec.rateLimit.requests, per: spec.rateLimit.per };
  if (spec.expiresIn !== undefined) body["expires_in"] = spec.expiresIn;
  if (spec.labels !== undefined) body["labels"] = { ...spec.labels };
  if (spec.breaker !== undefined) body["breaker"] = { ...spec.breaker };
  if (spec.enforce !== undefined) body["enforce"] = spec.enforce;
  if (spec.extra) Object.assign(body, spec.extra);
  return body;
}

function patchBody(patch: AgentPatch): Json {
  const body: Json = {};
  if (patch.scopes !== undefined) body["scopes"] = [...patch.scopes];
  if (patch.spendingCap !== undefined) body["spending_cap"] = amountText(patch.spendingCap, "spendingCap");
  if (patch.window !== undefined) body["window"] = patch.window;
  if (patch.perTxLimit !== undefined) body["per_tx_limit"] = amountText(patch.perTxLimit, "perTxLimit");
  if (patch.lifetimeCap !== undefined)
    body["lifetime_cap"] = patch.lifetimeCap === null ? null : amountText(patch.lifetimeCap, "lifetimeCap");
  if (patch.rateLimit !== undefined) body["rate_limit"] = patch.rateLimit;
  if (patch.labels !== undefined) body["labels"] = patch.labels;
  if (patch.breaker !== undefined) body["breaker"] = patch.breaker;
  if (patch.enforce !== undefined) body["enforce"] = patch.enforce;
  if (patch.extra) Object.assign(body, patch.extra);
  return body;
}

function events(data: unknown): AuditEvent[] {
  const list = (data as { events?: unknown }).events;
  return Array.isArray(list) ? list.map(toAuditEvent) : [];
}

async function revokeCall(t: Transport, token: string | null, handle: string, reason?: string, signal?: AbortSignal): Promise<string[]> {
  const body = reason === undefined ? {} : { reason };
  const data = await t.json({ method: "POST", path: `/v1/agents/${segment(handle)}/revoke`, token, body, signal });
  const revoked = (data as { revoked?: unknown }).revoked;
  return Array.isArray(revoked) ? revoked.map(String) : [];
}

function redact(key: string | null): string {
  return key === null ? "null" : `${key.slice(0, 6)}…`;
}

/**
 * An open hold: money reserved against every cap until it is captured or released.
 *
 * ```ts
 * const hold = await client.hold({ amount: "1.00", scope: "payments:write" });
 * await hold.capture("0.40");     // charges 0.40, releases 0.60
 * ```
 *
 * Or let {@link AgentClient.withHold} release it when the callback does not capture.
 */
export class Hold {
  /** The hold's identifier (`hold_…`). */
  readonly id: string;
  /** The amount held. */
  readonly amount: string;
  /** When the hold releases itself if it is still open. */
  readonly expiresAt: string | null;
  /** Whether the server answered from its idempotency record (the hold was made once, earlier). */
  readonly replayed: boolean;
  /** The answer to `POST /v1/holds`. */
  readonly raw: Json;
  /** How this object closed the hold, once it did. */
  settlement: Settlement | null = null;
  readonly #client: AgentClient;

  /** A hold from the answer to `POST /v1/holds` ({@link AgentClient.hold} makes them). */
  constructor(client: AgentClient, data: Json, replayed = false) {
    this.#client = client;
    this.id = String(data["id"]);
    this.amount = String(data["amount"]);
    this.expiresAt = typeof data["expires_at"] === "string" ? data["expires_at"] : null;
    this.replayed = replayed;
    this.raw = data;
  }

  /** Whether this object captured or released the hold. */
  get closed(): boolean {
    return this.settlement !== null;
  }

  /** Charges `amount` (at most what is held) and releases the rest. */
  async capture(amount: Amount, options: MoneyCallOptions = {}): Promise<Settlement> {
    this.settlement = await this.#client.capture(this.id, amount, options);
    return this.settlement;
  }

  /** Releases the whole hold: nothing is charged. */
  async release(options: MoneyCallOptions = {}): Promise<Settlement> {
    this.settlement = await this.#client.release(this.id, options);
    return this.settlement;
  }

  /** For `await using hold = await client.hold(...)`: releases the hold unless it was closed. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (this.closed) return;
    try {
      await this.release();
    } catch (e) {
      if (!(e instanceof HoldClosed)) throw e;
    }
  }
}

/**
 * An agent's client: it carries that agent's key and nothing else.
 *
 * Money calls (`spend`, `hold`, `capture`, `release`) always send an `Idempotency-Key` and are
 * retried with it after a connection failure or a `409 idempotency_in_progress`, so a retry
 * never charges twice.
 */
export class AgentClient {
  readonly #key: string;
  readonly #t: Transport;

  /**
   * A client for the agent whose key is `key`.
   *
   * @param key - the agent's key (`bk_…`).
   * @param options - the server (else `BULKHEAD_URL`), per-attempt timeout and retries.
   */
  constructor(key: string, options: ConnectionOptions = {}) {
    if (typeof key !== "string" || !key) throw new TypeError("key must be the agent's key, a non-empty string");
    this.#key = key;
    this.#t = new Transport(options);
  }

  /** The agent's key: give it to an OpenAI- or Anthropic-compatible client as `apiKey`. */
  get key(): string {
    return this.#key;
  }

  /** The server's base URL. */
  get url(): string {
    return this.#t.url;
  }

  /** The gateway URL of a configured upstream: `{url}/proxy/{upstream}`. */
  baseUrl(upstream: string): string {
    return `${this.#t.url}/proxy/${segment(upstream)}`;
  }

  /**
   * Spends `amount` under `scope`, or throws ({@link LimitExceeded}, {@link ScopeNotGranted}, …).
   *
   * @returns the receipt: `id`, `amount`, what `remaining` of the window cap.
   */
  async spend(request: SpendRequest): Promise<Receipt> {
    const body: Json = { scope: request.scope, amount: amountText(request.amount) };
    if (request.memo !== undefined) body["memo"] = request.memo;
    const answer = await this.#t.send({
      method: "POST",
      path: "/v1/spend",
      token: this.#key,
      body,
      retry: "money",
      idempotencyKey: moneyKey(request.idempotencyKey),
      signal: request.signal,
    });
    return toReceipt(answer.data, answer.replayed);
  }

  /**
   * Reserves `amount` under `scope` until captured or released (default expiry 5m). The hold
   * counts against every cap at once.
   */
  async hold(request: HoldRequest): Promise<Hold> {
    const body: Json = { scope: request.scope, amount: amountText(request.amount) };
    if (request.expiresIn !== undefined) body["expires_in"] = request.expiresIn;
    const answer = await this.#t.send({
      method: "POST",
      path: "/v1/holds",
      token: this.#key,
      body,
      retry: "money",
      idempotencyKey: moneyKey(request.idempotencyKey),
      signal: request.signal,
    });
    return new Hold(this, answer.data as Json, answer.replayed);
  }

  /**
   * Holds, runs `fn(hold)`, and releases the hold if `fn` neither captured nor released it
   * (also when `fn` throws; its error wins).
   *
   * ```ts
   * const result = await client.withHold({ amount: "1.00", scope }, async (hold) => {
   *   const answer = await callSomething();
   *   await hold.capture(answer.cost);
   *   return answer;
   * });
   * ```
   */
  async withHold<T>(request: HoldRequest, fn: (hold: Hold) => Promise<T> | T): Promise<T> {
    const hold = await this.hold(request);
    let result: T;
    try {
      result = await fn(hold);
    } catch (e) {
      if (!hold.closed) {
        try {
          await hold.release();
        } catch {
          // The callback's own error matters more; an unreleased hold expires by itself.
        }
      }
      throw e;
    }
    if (!hold.closed) {
      try {
        await hold.release();
      } catch (e) {
        if (!(e instanceof HoldClosed)) throw e;
      }
    }
    return result;
  }

  /** Charges `amount` of the hold `holdId` and releases the rest. */
  async capture(holdId: string, amount: Amount, options: MoneyCallOptions = {}): Promise<Settlement> {
    const answer = await this.#t.send({
      method: "POST",
      path: `/v1/holds/${segment(holdId)}/capture`,
      token: this.#key,
      body: { amount: amountText(amount) },
      retry: "money",
      idempotencyKey: moneyKey(options.idempotencyKey),
      signal: options.signal,
    });
    return toSettlement(answer.data, answer.replayed);
  }

  /** Releases the whole hold `holdId`. */
  async release(holdId: string, options: MoneyCallOptions = {}): Promise<Settlement> {
    const answer = await this.#t.send({
      method: "POST",
      path: `/v1/holds/${segment(holdId)}/release`,
      token: this.#key,
      body: {},
      retry: "money",
      idempotencyKey: moneyKey(options.idempotencyKey),
      signal: options.signal,
    });
    return toSettlement(answer.data, answer.replayed);
  }

  /** This agent: its limits, status and usage (`GET /v1/me`). */
  async me(options: CallOptions = {}): Promise<Agent> {
    return toAgent(await this.#t.json({ method: "GET", path: "/v1/me", token: this.#key, signal: options.signal }));
  }

  /** This agent's audit trail, oldest first; page with `limit` and `after` (a `seq`). */
  async meAudit(page: Page & CallOptions = {}): Promise<AuditEvent[]> {
    const query = { limit: page.limit, after: page.after };
    return events(await this.#t.json({ method: "GET", path: "/v1/me/audit", token: this.#key, query, signal: page.signal }));
  }

  /**
   * Creates a child of this agent (its key needs the `spawn:agents` scope).
   *
   * The child's scopes must be covered by this agent's and its caps may not exceed them; every
   * spend of the child also counts against this agent. The returned account can revoke the
   * child with this agent's key.
   */
  async spawn(spec: AgentSpec & CallOptions): Promise<AgentAccount> {
    const data = await this.#t.json({
      method: "POST",
      path: "/v1/agents",
      token: this.#key,
      body: agentBody(spec),
      retry: "connect",
      signal: spec.signal,
    });
    return AgentAccount.fromCreated(data as Json, { parentKey: this.#key, connection: this.#t.options() });
  }

  /** Revokes a descendant of this agent (and its subtree); returns every revoked handle. */
  async revoke(handle: string, options: { reason?: string } & CallOptions = {}): Promise<string[]> {
    return revokeCall(this.#t, this.#key, handle, options.reason, options.signal);
  }

  /** The URL and a redacted key. */
  toString(): string {
    return `AgentClient(url=${this.#t.url}, key=${redact(this.#key)})`;
  }

  /** The same as `toString()`: the key is never printed whole. */
  toJSON(): { url: string; key: string } {
    return { url: this.#t.url, key: redact(this.#key) };
  }

  /** For `console.log`: the key is never printed whole. */
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }
}

/** Options of an `AgentAccount` made for an existing agent. */
export interface AccountOptions extends ConnectionOptions {
  /** The agent's key, when known. */
  key?: string | null;
  /** The admin token, else `BULKHEAD_ADMIN_TOKEN`. */
  adminToken?: string | null;
  /** The key of the agent's parent, which may revoke it. */
  parentKey?: string | null;
  /** The agent object as last read. */
  agent?: Agent | null;
}

/**
 * An agent, as its creator sees it: its handle, its key, and the calls that manage it.
 *
 * `AgentAccount.create(...)` makes a new agent with the admin token; `AgentAccount.fromKey`
 * wraps a key a process was given; `client.spawn(...)` makes a child. Admin calls use `url` and
 * `adminToken`, else `BULKHEAD_URL` and `BULKHEAD_ADMIN_TOKEN`.
 */
export class AgentAccount {
  /** The agent's handle. */
  handle: string;
  #key: string | null;
  readonly #adminToken: string | null;
  readonly #parentKey: string | null;
  #agent: Agent | null;
  readonly #t: Transport;

  /** An account for the existing agent `handle` (with its `key`, when known). */
  constructor(handle: string, options: AccountOptions = {}) {
    this.handle = handle;
    this.#key = options.key ?? null;
    this.#adminToken = resolveAdminToken(options.adminToken);
    this.#parentKey = options.parentKey ?? null;
    this.#agent = options.agent ?? null;
    this.#t = new Transport(options);
  }

  /**
   * Creates an agent with its own key (`POST /v1/agents`, with the admin token).
   *
   * ```ts
   * const account = await AgentAccount.create({
   *   handle: "invoice-processor-prod-01", scopes: ["payments:write"],
   *   spendingCap: "50.00", perTxLimit: "5.00", window: "24h" });
   * ```
   *
   * @returns the account, with `key` set: the credential is shown this once.
   */
  static async create(options: CreateAgentOptions & CallOptions): Promise<AgentAccount> {
    const token = resolveAdminToken(options.adminToken);
    if (token === null) {
      throw new TypeError("creating an agent needs the admin token: pass adminToken or set BULKHEAD_ADMIN_TOKEN");
    }
    const body = agentBody(options);
    const account = new AgentAccount(options.handle, { ...options, adminToken: token });
    const data = (await account.#t.json({
      method: "POST",
      path: "/v1/agents",
      token,
      body,
      retry: "connect",
      signal: options.signal,
    })) as Json;
    account.#key = String(data["key"]);
    account.#agent = toAgent(data);
    return account;
  }

  /** The account of the agent whose key is `key` (its handle read with `GET /v1/me`). */
  static async fromKey(key: string, options: ConnectionOptions & { adminToken?: string } = {}): Promise<AgentAccount> {
    const account = new AgentAccount("", { ...options, key, adminToken: options.adminToken ?? null });
    const agent = toAgent(await account.#t.json({ method: "GET", path: "/v1/me", token: key }));
    account.#agent = agent;
    account.handle = agent.handle;
    return account;
  }

  /** Every agent (admin), in handle order; page with `limit` and `after` (a handle). */
  static async list(options: ConnectionOptions & Page & CallOptions & { adminToken?: string } = {}): Promise<Agent[]> {
    const token = resolveAdminToken(options.adminToken);
    const t = new Transport(options);
    const data = await t.json({
      method: "GET",
      path: "/v1/agents",
      token,
      query: { limit: options.limit, after: options.after },
      signal: options.signal,
    });
    const list = (data as { agents?: unknown }).agents;
    return Array.isArray(list) ? list.map(toAgent) : [];
  }

  /** @internal An account from the 201 answer to a create made with `parentKey`. */
  static fromCreated(data: Json, init: { parentKey: string | null; connection: ConnectionOptions }): AgentAccount {
    const agent = toAgent(data);
    return new AgentAccount(agent.handle, {
      ...init.connection,
      key: String(data["key"]),
      parentKey: init.parentKey,
      adminToken: null,
      agent,
    });
  }

  /** The agent's key (`bk_…`); throws when this account does not know it. */
  get key(): string {
    if (this.#key === null) throw new TypeError(`the key of ${JSON.stringify(this.handle)} is not known to this account`);
    return this.#key;
  }

  /** The server's base URL. */
  get url(): string {
    return this.#t.url;
  }

  /** The agent object as last read (at creation, or by `refresh`). */
  get agent(): Agent | null {
    return this.#agent;
  }

  /** A client carrying this agent's key (same server, timeout and retries unless given). */
  client(options: ConnectionOptions = {}): AgentClient {
    return new AgentClient(this.key, { ...this.#t.options(), ...options });
  }

  /** Reads the agent again: with the admin token if there is one, else its own key, else its parent's. */
  async refresh(options: CallOptions = {}): Promise<Agent> {
    let data: unknown;
    if (this.#adminToken !== null && this.handle) {
      data = await this.#t.json({ method: "GET", path: `/v1/agents/${segment(this.handle)}`, token: this.#adminToken, signal: options.signal });
    } else if (this.#key !== null) {
      data = await this.#t.json({ method: "GET", path: "/v1/me", token: this.#key, signal: options.signal });
    } else {
      data = await this.#t.json({ method: "GET", path: `/v1/agents/${segment(this.handle)}`, token: this.#parentKey, signal: options.signal });
    }
    this.#agent = toAgent(data);
    return this.#agent;
  }

  /** The agent's usage now (its descendants' spends and holds included). */
  async usage(options: CallOptions = {}): Promise<Usage> {
    const usage = (await this.refresh(options)).usage;
    if (usage === null) throw new BulkheadError("the agent object has no usage", { code: "invalid_response" });
    return usage;
  }

  /** The agent's audit trail (admin token, else its own key), oldest first. */
  async audit(page: Page & CallOptions = {}): Promise<AuditEvent[]> {
    const query = { limit: page.limit, after: page.after };
    if (this.#adminToken !== null) {
      return events(
        await this.#t.json({ method: "GET", path: `/v1/agents/${segment(this.handle)}/audit`, token: this.#adminToken, query, signal: page.signal }),
      );
    }
    return events(await this.#t.json({ method: "GET", path: "/v1/me/audit", token: this.key, query, signal: page.signal }));
  }

  /**
   * Revokes the agent and every descendant; returns their handles. Uses the admin token, else
   * (for a spawned child) its parent's key. Idempotent.
   */
  async revoke(options: { reason?: string } & CallOptions = {}): Promise<string[]> {
    return revokeCall(this.#t, this.#manager(), this.handle, options.reason, options.signal);
  }

  /** Suspends the agent and its subtree (403 `agent_suspended`) until `resume` (admin). */
  async suspend(options: { reason?: string } & CallOptions = {}): Promise<Agent> {
    const body = options.reason === undefined ? {} : { reason: options.reason };
    const path = `/v1/agents/${segment(this.handle)}/suspend`;
    this.#agent = toAgent(await this.#t.json({ method: "POST", path, token: this.#manager(), body, signal: options.signal }));
    return this.#agent;
  }

  /** Lifts a suspension (admin). */
  async resume(options: CallOptions = {}): Promise<Agent> {
    const path = `/v1/agents/${segment(this.handle)}/resume`;
    this.#agent = toAgent(await this.#t.json({ method: "POST", path, token: this.#manager(), body: {}, signal: options.signal }));
    return this.#agent;
  }

  /** Gives the agent a new key (the old one stops working at once) and returns it (admin). */
  async rotateKey(options: CallOptions = {}): Promise<string> {
    const path = `/v1/agents/${segment(this.handle)}/keys`;
    const data = (await this.#t.json({ method: "POST", path, token: this.#manager(), body: {}, retry: "connect", signal: options.signal })) as Json;
    this.#key = String(data["key"]);
    return this.#key;
  }

  /** Changes caps, window, scopes, rate limit, labels, … (`PATCH`, admin); amounts exact. */
  async update(patch: AgentPatch & CallOptions): Promise<Agent> {
    const path = `/v1/agents/${segment(this.handle)}`;
    this.#agent = toAgent(await this.#t.json({ method: "PATCH", path, token: this.#manager(), body: patchBody(patch), signal: patch.signal }));
    return this.#agent;
  }

  /** The handle, URL and a redacted key. */
  toString(): string {
    return `AgentAccount(handle=${this.handle}, url=${this.#t.url}, key=${redact(this.#key)})`;
  }

  /** For `console.log`: the key is never printed whole. */
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }

  #manager(): string | null {
    return this.#adminToken ?? this.#parentKey ?? this.#key;
  }
}
