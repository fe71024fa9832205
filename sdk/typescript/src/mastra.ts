/**
 * Mastra: one Bulkhead account per workflow run, guarded tools, and models through the gateway.
 *
 * ```ts
 * import { createWorkflow, createStep } from "@mastra/core/workflows";
 * import { withRunAccount, runClient, runContext, guard, model } from "bulkhead/mastra";
 *
 * const parent = (await AgentAccount.fromKey(process.env.RESEARCH_KEY!)).client(); // holds spawn:agents
 * const search = guard(searchTool, runClient, { scope: "tools:search", cost: "0.01" });
 *
 * const research = createStep({
 *   id: "research", inputSchema, outputSchema,
 *   execute: async (params) => {
 *     const agent = new Agent({ id: "researcher", name: "researcher", instructions: "…",
 *       model: model(runClient(params), "gpt-4o-mini"), tools: { search } });
 *     const answer = await agent.generate(params.inputData.question, { requestContext: runContext(params) });
 *     return { answer: answer.text };
 *   },
 * });
 *
 * const workflow = createWorkflow(withRunAccount(
 *   { id: "research", inputSchema, outputSchema },
 *   { parent, scopes: ["tools:search", "llm:openai"], spendingCap: "0.50", expiresIn: "1h" },
 * )).then(research).commit();
 * ```
 *
 * Each run of such a workflow gets its own child of `parent`, created when the run starts
 * (handle `run-<runId>`, the scopes and caps given, which may not exceed the parent's) and
 * revoked when the run ends: success, failure, cancellation or tripwire. A suspended run keeps
 * its account until it ends. Steps and tools find the run's account by the run's id or its
 * `requestContext`; `guard` makes a tool pay before it runs, and `model` points
 * a Mastra agent at the Bulkhead gateway with the run's key.
 *
 * `@mastra/core` (≥ 1.0) is a peer dependency of this entry point only.
 *
 * @module
 */

import { createTool } from "@mastra/core/tools";
import type { OpenAICompatibleConfig } from "@mastra/core/llm";
import type {
  WorkflowFinishCallbackResult,
  WorkflowOptions,
  WorkflowStartCallbackInfo,
} from "@mastra/core/workflows";
import { type Amount, amountText, toMicros } from "./amounts.js";
import type { AgentAccount, AgentClient, AgentSpec, Hold, HoldRequest } from "./client.js";
import { BulkheadError } from "./errors.js";
import type { Json, RateLimit } from "./models.js";

/** The `requestContext` key under which a run's {@link AgentAccount} is kept. */
export const RUN_ACCOUNT_KEY = "bulkhead.account";

/** What a run's account is looked up from: a step's execute parameters or a tool's context. */
export interface RunContextLike {
  /** The workflow run's id (a step's parameters carry it). */
  runId?: string;
  /** The run's request context. */
  requestContext?: { get(key: string): unknown; set(key: string, value: unknown): void } | undefined;
  /** A tool's workflow context, when the tool runs as (or in) a workflow step. */
  workflow?: { runId?: string } | undefined;
}

/** What a run's child account is made from. */
export interface RunAccountOptions {
  /**
   * The parent: a client whose key holds `spawn:agents` (or a function giving one, called at
   * each run's start). Every spend of every run also counts against the parent's caps.
   */
  parent: AgentClient | (() => AgentClient | Promise<AgentClient>);
  /** The run's scopes; each must be covered by the parent's. */
  scopes: string[];
  /** The most the run may spend per window (at most the parent's cap). */
  spendingCap: Amount;
  /** The cap's window (default `"24h"`). */
  window?: string;
  /** The most one spend may be. */
  perTxLimit?: Amount;
  /** The most the run may ever spend (required if the parent has a lifetime cap). */
  lifetimeCap?: Amount;
  /** The run's request rate limit. */
  rateLimit?: RateLimit;
  /**
   * When the run's key expires even if the end of the run is never seen (the process died),
   * e.g. `"1h"`. Recommended.
   */
  expiresIn?: string;
  /** Labels; `workflow` and `run` are added. */
  labels?: Record<string, string>;
  /** The runaway-loop breaker's settings for the run. */
  breaker?: Json;
  /** The child's handle for a run (default `run-<runId>`), sanitized to `a-z0-9._-`, ≤ 64. */
  handle?: (info: { runId: string; workflowId: string }) => string;
  /** Called after a run's account was revoked (or with the error if revoking failed). */
  onRevoked?: (info: { runId: string; handle: string; status: string; revoked: string[]; error?: unknown }) => void;
}

const accounts = new Map<string, AgentAccount>();

/** A handle of the server's alphabet (`a-z 0-9 . _ -`, ≤ 64, starting with a letter or digit). */
export function runHandle(text: string): string {
  let h = text.toLowerCase().replace(/[^a-z0-9._-]+/g, "-");
  h = h.replace(/^[^a-z0-9]+/, "");
  h = h.slice(0, 64).replace(/[^a-z0-9]+$/, "");
  if (!h) throw new RangeError(`no handle can be made from ${JSON.stringify(text)}`);
  return h;
}

async function resolveParent(parent: RunAccountOptions["parent"]): Promise<AgentClient> {
  return typeof parent === "function" ? await parent() : parent;
}

/**
 * The `onStart`/`onFinish` hooks that give each run of a workflow its own child account.
 *
 * Pass them in the workflow's `options` (or use {@link withRunAccount}, which also keeps hooks
 * you already have). `onStart` creates the child with the parent's key; an error there (the
 * parent may not spawn, `cap_escalation`, …) rejects `run.start()` and no step runs. `onFinish`
 * revokes it unless the run is only suspended.
 */
export function runAccountHooks(options: RunAccountOptions): Required<Pick<WorkflowOptions, "onStart" | "onFinish">> {
  // Refuse bad amounts now, not at the first run.
  amountText(options.spendingCap, "spendingCap");
  if (options.perTxLimit !== undefined) amountText(options.perTxLimit, "perTxLimit");
  if (options.lifetimeCap !== undefined) amountText(options.lifetimeCap, "lifetimeCap");
  return {
    async onStart(info: WorkflowStartCallbackInfo): Promise<void> {
      const parent = await resolveParent(options.parent);
      const handle = runHandle(options.handle ? options.handle(info) : `run-${info.runId}`);
      const spec: AgentSpec = {
        handle,
        scopes: options.scopes,
        spendingCap: options.spendingCap,
        labels: { ...options.labels, workflow: info.workflowId, run: info.runId },
      };
      if (options.window !== undefined) spec.window = options.window;
      if (options.perTxLimit !== undefined) spec.perTxLimit = options.perTxLimit;
      if (options.lifetimeCap !== undefined) spec.lifetimeCap = options.lifetimeCap;
      if (options.rateLimit !== undefined) spec.rateLimit = options.rateLimit;
      if (options.expiresIn !== undefined) spec.expiresIn = options.expiresIn;
      if (options.breaker !== undefined) spec.breaker = options.breaker;
      const account = await parent.spawn(spec);
      accounts.set(info.runId, account);
      info.requestContext?.set(RUN_ACCOUNT_KEY, account);
    },
    async onFinish(result: WorkflowFinishCallbackResult): Promise<void> {
      if (result.status === "suspended" || result.status === "paused" || result.status === "waiting") return;
      const account = accounts.get(result.runId);
      if (account === undefined) return;
      accounts.delete(result.runId);
      try {
        const revoked = await account.revoke({ reason: `workflow run ${result.status}` });
        options.onRevoked?.({ runId: result.runId, handle: account.handle, status: String(result.status), revoked });
      } catch (error) {
        options.onRevoked?.({ runId: result.runId, handle: account.handle, status: String(result.status), revoked: [], error });
        throw error;
      }
    },
  };
}

/**
 * A workflow's config with run accounts: `createWorkflow(withRunAccount({id, …}, {parent, …}))`.
 *
 * The config's own `options.onStart`/`onFinish`/`onError` still run: yours after the account
 * was created, and before it is revoked.
 */
export function withRunAccount<C extends object>(config: C, options: RunAccountOptions): NoInfer<C> {
  const hooks = runAccountHooks(options);
  const own: WorkflowOptions = (config as { options?: WorkflowOptions }).options ?? {};
  const merged: WorkflowOptions = {
    ...own,
    async onStart(info: WorkflowStartCallbackInfo) {
      await hooks.onStart(info);
      if (own.onStart) {
        try {
          await own.onStart(info);
        } catch (e) {
          // The run will not execute: its account goes at once.
          const account = accounts.get(info.runId);
          accounts.delete(info.runId);
          await account?.revoke({ reason: "workflow run refused by onStart" }).catch(() => undefined);
          throw e;
        }
      }
    },
    async onFinish(result: WorkflowFinishCallbackResult) {
      try {
        if (own.onFinish) await own.onFinish(result);
      } finally {
        await hooks.onFinish(result);
      }
    },
  };
  return { ...config, options: merged };
}

/**
 * The account of the run `context` belongs to (a step's parameters, or a tool's context).
 *
 * Looked up by the run's `runId`, else in its `requestContext`; a step's lookup also stores it in
 * the step's `requestContext`, so agents and tools given that context find it.
 *
 * @throws BulkheadError (`code` `"no_run_account"`) outside a run of a workflow made with
 *   {@link withRunAccount}, or after the run ended.
 */
export function runAccount(context: RunContextLike): AgentAccount {
  // The run's id first: a requestContext shared by several runs must not lend one run's account
  // to another. A tool inside an agent has the agent's own runId; it finds the requestContext.
  const runId = context.workflow?.runId ?? context.runId;
  const byRun = runId === undefined ? undefined : accounts.get(runId);
  if (byRun !== undefined) {
    if (context.requestContext && context.requestContext.get(RUN_ACCOUNT_KEY) !== byRun) {
      context.requestContext.set(RUN_ACCOUNT_KEY, byRun);
    }
    return byRun;
  }
  const fromContext = context.requestContext?.get(RUN_ACCOUNT_KEY);
  if (fromContext !== undefined && fromContext !== null) return fromContext as AgentAccount;
  throw new BulkheadError(
    "no Bulkhead account for this run: create the workflow with withRunAccount(...) and pass the run's requestContext to agents",
    { code: "no_run_account" },
  );
}

/** A client with the key of the run `context` belongs to (see {@link runAccount}). */
export function runClient(context: RunContextLike): AgentClient {
  return runAccount(context).client();
}

/**
 * The step's `requestContext`, holding the run's account: give it to `agent.generate(…, {
 * requestContext })` so that guarded tools and models pay with the run's key.
 */
export function runContext<R extends { get(key: string): unknown; set(key: string, value: unknown): void }>(context: RunContextLike & { requestContext: R }): R {
  runAccount(context);
  return context.requestContext;
}

/** The accounts of the runs under way in this process, by run id. */
export function activeRunAccounts(): ReadonlyMap<string, AgentAccount> {
  return new Map(accounts);
}

/** Who pays for a guarded tool: a client, or a function of the tool's context (e.g. {@link runClient}). */
export type ClientSource = AgentClient | ((context: RunContextLike) => AgentClient | Promise<AgentClient>);

/** `guard(tool, client, {scope, cost})`: a fixed price per call. */
export interface GuardCostOptions {
  /** The scope each call is paid under, e.g. `"tools:search"`. */
  scope: string;
  /** What one call costs. */
  cost: Amount;
  /** The spend's memo (default `tool:<id>`). */
  memo?: string;
}

/** `guard(tool, client, {scope, hold, costOf})`: a price known only after the call. */
export interface GuardHoldOptions {
  /** The scope the hold and its capture are made under. */
  scope: string;
  /** The most one call may cost: held before the tool runs. */
  hold: Amount;
  /**
   * The call's actual price, from the tool's result; more than the hold is charged as the hold,
   * and if it throws the whole hold is charged (the tool did run). Without it, the whole hold.
   */
  costOf?: (result: any) => Amount | Promise<Amount>;
  /** When an unsettled hold releases itself (default `"5m"`). */
  expiresIn?: string;
}

/** The options of {@link guard}: a fixed `cost`, or a `hold` settled by `costOf`. */
export type GuardOptions = GuardCostOptions | GuardHoldOptions;

/** The smallest shape of a Mastra tool that `guard` wraps. */
export interface ToolLike {
  id: string;
  execute?: ((input: any, context: any) => Promise<any>) | undefined;
}

/**
 * A Mastra tool that spends `cost` under `scope` before `tool` runs.
 *
 * The spend is made with `client` (or the client the function gives for the call's context:
 * pass {@link runClient} to pay with the run's key). A denied spend never runs the tool: the
 * call fails with an error whose message starts with the code, e.g.
 * `spending_cap_exceeded: … (tool 'search' did not run)`, which a Mastra agent hands to the model
 * as the tool's error. The returned tool has the wrapped tool's id, description and schemas.
 *
 * With `{scope, hold, costOf}` instead of `cost`, each call holds `hold` first, runs the tool,
 * captures `costOf(result)` (at most the hold) and releases the rest; a tool that throws is
 * charged nothing, a `costOf` that throws is charged the whole hold.
 */
export function guard<T extends ToolLike>(tool: T, client: ClientSource, options: GuardOptions): T {
  const inner = tool.execute;
  if (typeof inner !== "function") throw new TypeError(`tool '${tool.id}' has no execute function`);
  const payer = async (context: RunContextLike | undefined): Promise<AgentClient> =>
    typeof client === "function" ? await client(context ?? {}) : client;
  let execute: (input: unknown, context: RunContextLike | undefined) => Promise<unknown>;
  if ("hold" in options) {
    const held = amountText(options.hold, "hold");
    const { costOf, expiresIn } = options;
    execute = async (input, context) => {
      let hold: Hold;
      try {
        const request: HoldRequest = { amount: held, scope: options.scope };
        if (expiresIn !== undefined) request.expiresIn = expiresIn;
        hold = await (await payer(context)).hold(request);
      } catch (e) {
        throw denied(e, tool.id);
      }
      let result: unknown;
      try {
        result = await inner.call(tool, input, context);
      } catch (e) {
        await hold.release().catch(() => undefined); // else the hold expires by itself
        throw e;
      }
      let cost = held;
      if (costOf !== undefined) {
        try {
          const price = amountText(await costOf(result), "costOf(result)");
          if (toMicros(price) < toMicros(held)) cost = price;
        } catch {
          // The tool ran and its price is unknown: it is charged the most it could cost.
        }
      }
      if (toMicros(cost) === 0n) await hold.release();
      else await hold.capture(cost);
      return result;
    };
  } else {
    const cost = amountText(options.cost, "cost");
    const memo = options.memo ?? `tool:${tool.id}`;
    execute = async (input, context) => {
      try {
        await (await payer(context)).spend({ amount: cost, scope: options.scope, memo });
      } catch (e) {
        throw denied(e, tool.id);
      }
      return inner.call(tool, input, context);
    };
  }
  // createTool validates the input against the same schemas, then calls `execute`.
  return createTool({ ...(tool as object), id: tool.id, execute } as unknown as Parameters<typeof createTool>[0]) as unknown as T;
}

/** `metered(tool, client, {scope, maxCost, costOf})`. */
export interface MeteredOptions {
  /** The scope the hold and its capture are made under. */
  scope: string;
  /** What one call may cost at most: held before the tool runs. */
  maxCost: Amount;
  /** The call's actual cost, from the tool's result (more than `maxCost` is charged as `maxCost`). */
  costOf: (result: any) => Amount | Promise<Amount>;
  /** When an unsettled hold releases itself (default `"5m"`). */
  expiresIn?: string;
}

/**
 * A Mastra tool whose cost is known only after it ran: `guard(tool, client, {scope, hold:
 * maxCost, costOf})`. It holds `maxCost`, runs `tool`, captures `costOf(result)` (at most the
 * hold; nothing is charged for a price of 0) and releases the rest. If the tool throws, the hold
 * is released; if `costOf` throws, the whole hold is charged. A refused hold never runs the tool.
 */
export function metered<T extends ToolLike>(tool: T, client: ClientSource, options: MeteredOptions): T {
  const hold: GuardHoldOptions = { scope: options.scope, hold: options.maxCost, costOf: options.costOf };
  if (options.expiresIn !== undefined) hold.expiresIn = options.expiresIn;
  return guard(tool, client, hold);
}

function denied(e: unknown, toolId: string): unknown {
  if (!(e instanceof BulkheadError)) return e;
  const error = new Error(`${e.code}: ${e.message} (tool '${toolId}' did not run)`, { cause: e });
  error.name = "BulkheadDenied";
  return error;
}

/** `model(client, modelId, {upstream})`. */
export interface ModelOptions {
  /** The gateway upstream (default `"openai"`): calls go to `{url}/proxy/{upstream}/v1/…`. */
  upstream?: string;
  /** Which OpenAI API the model speaks (default: Mastra's, chat completions). */
  api?: "chat" | "responses";
  /** Extra headers for every model call. */
  headers?: Record<string, string>;
}

/**
 * A model config for a Mastra `Agent` that calls `modelId` through the Bulkhead gateway with
 * `client`'s key, so every model call is checked, capped and metered for that agent.
 *
 * It is Mastra's own OpenAI-compatible config (`{providerId, modelId, url, apiKey}`): no other
 * package is needed. Use it as `new Agent({ model: model(runClient(params), "gpt-4o-mini"), … })`.
 */
export function model(client: AgentClient, modelId: string, options: ModelOptions = {}): OpenAICompatibleConfig {
  const upstream = options.upstream ?? "openai";
  const config: OpenAICompatibleConfig = {
    providerId: upstream,
    modelId,
    url: `${client.baseUrl(upstream)}/v1`,
    apiKey: client.key,
  };
  if (options.api !== undefined) config.api = options.api;
  if (options.headers !== undefined) config.headers = { ...options.headers };
  return config;
}
