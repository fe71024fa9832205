// Compiled (not run) by the test script: the published types serve a strict TypeScript consumer.
import {
  AgentAccount,
  AgentClient,
  BulkheadError,
  type Agent,
  type Receipt,
  type Settlement,
  SpendingCapExceeded,
} from "bulkhead";
import { guard, model, runAccount, runClient, runContext, withRunAccount } from "bulkhead/mastra";
import { Agent as MastraAgent } from "@mastra/core/agent";
import { createTool } from "@mastra/core/tools";
import { createStep, createWorkflow } from "@mastra/core/workflows";
import { z } from "zod";

export async function quickStart(): Promise<string[]> {
  const account = await AgentAccount.create({
    handle: "invoice-processor-prod-01",
    spendingCap: "50.00",
    perTxLimit: 5,
    window: "24h",
    scopes: ["payments:write", "invoices:read"],
  });
  const client: AgentClient = account.client();
  const receipt: Receipt = await client.spend({ amount: "2.50", scope: "payments:write" });
  const remaining: string | null = receipt.remaining;
  const hold = await client.hold({ amount: 1n, scope: "payments:write" });
  const settled: Settlement = await hold.capture("0.40");
  await using open = await client.hold({ amount: "0.10", scope: "payments:write" });
  const me: Agent = await client.me();
  try {
    await client.spend({ amount: 0.25, scope: "payments:write", idempotencyKey: "invoice-4711" });
  } catch (e) {
    if (e instanceof SpendingCapExceeded) {
      const wait: number | null = e.retryAfter;
      void wait;
    } else if (e instanceof BulkheadError) {
      const fields: [number | null, string, string, string | null] = [e.status, e.code, e.message, e.remaining];
      void fields;
    }
  }
  void [remaining, settled, me, open];
  const child = await (await AgentAccount.fromKey(account.key)).client().spawn({ handle: "c", scopes: ["payments:write"], spendingCap: "1" });
  return child.revoke();
}

const search = createTool({
  id: "search",
  description: "Searches.",
  inputSchema: z.object({ q: z.string() }),
  execute: async ({ q }) => ({ hits: [q] }),
});
const paid = guard(search, runClient, { scope: "tools:search", cost: "0.01" });

const step = createStep({
  id: "research",
  inputSchema: z.object({ question: z.string() }),
  outputSchema: z.object({ answer: z.string(), handle: z.string() }),
  execute: async (params) => {
    const agent = new MastraAgent({
      id: "researcher",
      name: "researcher",
      instructions: "Search.",
      model: model(runClient(params), "gpt-4o-mini"),
      tools: { search: paid },
    });
    const answer = await agent.generate(params.inputData.question, { requestContext: runContext(params) });
    return { answer: answer.text, handle: runAccount(params).handle };
  },
});

export const workflow = createWorkflow(
  withRunAccount(
    { id: "research", inputSchema: z.object({ question: z.string() }), outputSchema: z.object({ answer: z.string(), handle: z.string() }) },
    { parent: new AgentClient("bk_parent"), scopes: ["tools:search"], spendingCap: "0.50", expiresIn: "1h" },
  ),
)
  .then(step)
  .commit();
