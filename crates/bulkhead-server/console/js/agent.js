// One agent: what it may do (caps, scopes), what it spawned, what it spent over time, and its
// audit trail; with every action on it.

import { api, enc } from "./api.js";
import { editAgent, resumeAgent, revokeAgent, rotateKey, suspendAgent } from "./actions.js";
import { spendChart } from "./chart.js";
import { children, fleet, onChange, refetch } from "./live.js";
import { agentLink, badge, clear, h, money, utilBar, when } from "./ui.js";

const TREE_MAX = 500;
const AUDIT_PAGE = 50;

export function renderAgent(root, handle) {
  const top = h("div");
  const facts = h("div.grid2");
  const tree = h("div");
  const chart = h("div.chart", h("p.muted", "Loading…"));
  const audit = h("div");
  const bucket = h("select#usage-bucket",
    h("option", { value: "1m" }, "per minute, last hour"),
    h("option", { value: "1h" }, "per hour, last 2 days"),
    h("option", { value: "1d" }, "per day, last 30 days"));
  bucket.value = "1h";
  clear(root, top, facts,
    h("section.card", { "aria-labelledby": "tree-h" }, h("h2#tree-h", "Children"), tree),
    h("section.card", { "aria-labelledby": "usage-h" },
      h("h2#usage-h", "Usage over time"),
      h("div.toolbar", h("div.field", h("label", { for: "usage-bucket" }, "Buckets"), bucket)), chart),
    h("section.card", { "aria-labelledby": "audit-h" }, h("h2#audit-h", "Audit trail"), audit));

  let shownVersion = -1;
  const draw = () => {
    const a = fleet.agents.get(handle);
    if (!a) {
      clear(top, h("h1", handle), h("p.muted", fleet.loaded ? "No agent with that handle." : "Loading…"));
      return;
    }
    const u = a.usage;
    const suspendBtn = h("button#act-suspend", { type: "button", on: { click: () => suspendAgent(a) } }, "Suspend");
    const live = a.status !== "revoked";
    clear(top,
      h("h1", handle, " ", badge(a.status)),
      h("p.summary", a.parent ? ["Child of ", agentLink(a.parent), ". "] : "Root agent. ",
        `Created ${when(a.created_at)}.`, a.revoked_at ? ` Revoked ${when(a.revoked_at)}.` : "",
        a.suspended_at ? ` Suspended ${when(a.suspended_at)}.` : ""),
      live ? h("div.actions", { role: "group", "aria-label": "Actions" },
        h("button#act-edit", { type: "button", on: { click: () => editAgent(a) } }, "Change caps and scopes"),
        a.status === "suspended"
          ? h("button#act-resume", { type: "button", on: { click: () => resumeAgent(a) } }, "Resume")
          : suspendBtn,
        h("button#act-rotate", { type: "button", on: { click: () => rotateKey(a) } }, "Rotate key"),
        h("button.danger#act-revoke", { type: "button", on: { click: () => revokeAgent(a) } }, "Revoke…")) : null);
    clear(facts,
      h("section.card", { "aria-labelledby": "caps-h" }, h("h2#caps-h", "Caps and usage"),
        h("dl.facts#caps",
          h("dt", "Utilization"), h("dd#utilization", utilBar(u.utilization)),
          h("dt", "Window spent / cap"), h("dd", `${money(u.window_spent)} / ${money(a.spending_cap)} per ${a.window}`),
          h("dt", "Held"), h("dd", money(u.window_held)),
          h("dt", "Window resets"), h("dd", when(u.window_resets_at)),
          h("dt", "Per transaction"), h("dd", money(a.per_tx_limit)),
          h("dt", "Lifetime spent / cap"), h("dd", `${money(u.lifetime_spent)} / ${a.lifetime_cap ? money(a.lifetime_cap) : "no cap"}`),
          h("dt", "Rate limit"), h("dd", a.rate_limit ? `${a.rate_limit.requests} per ${a.rate_limit.per}` : "none"),
          h("dt", "Key expires"), h("dd", a.expires_at ? when(a.expires_at) : "never"),
          h("dt", "Transactions / denials"), h("dd", `${u.tx_count} / ${u.denied_count}`))),
      h("section.card", { "aria-labelledby": "scopes-h" }, h("h2#scopes-h", "Scopes"),
        h("ul.scopes#scopes", a.scopes.map((s) => h("li", s))),
        Object.keys(a.labels ?? {}).length ? [h("h2", "Labels"),
          h("ul.scopes", Object.entries(a.labels).map(([k, v]) => h("li", `${k}=${v}`)))] : null));
    let n = 0;
    const node = (x) => {
      if (++n > TREE_MAX) return null;
      const c = fleet.agents.get(x);
      const kids = children(x);
      return h("li", agentLink(x), " ", c ? badge(c.status) : "", c ? [" ", utilBar(c.usage.utilization)] : "",
        kids.length ? h("ul", kids.map(node)) : null);
    };
    const kids = children(handle);
    clear(tree, kids.length ? h("ul.tree#children", kids.map(node)) : h("p.muted", "None."),
      n > TREE_MAX ? h("p.hint", `Showing the first ${TREE_MAX}.`) : null);
    shownVersion = fleet.version;
  };

  let chartGeneration = 0;
  const loadChart = async () => {
    const mine = ++chartGeneration;
    const b = bucket.value;
    const limit = b === "1m" ? 60 : b === "1h" ? 48 : 30;
    try {
      const r = await api("GET", `/v1/agents/${enc(handle)}/usage?bucket=${b}&limit=${limit}`);
      if (mine !== chartGeneration) return;
      clear(chart, spendChart(r.buckets, { "1m": "minute", "1h": "hour", "1d": "day" }[b]));
    } catch (e) {
      clear(chart, h("p.error", e.message));
    }
  };
  bucket.addEventListener("change", loadChart);

  // The audit trail, newest first, filtered on the server.
  const outcome = h("select#audit-outcome", h("option", { value: "" }, "any"),
    h("option", { value: "allowed" }, "allowed"), h("option", { value: "denied" }, "denied"));
  const action = h("select#audit-action", ["", "spend", "hold", "capture", "release", "hold.expire", "agent.create",
    "agent.update", "agent.revoke", "agent.suspend", "agent.resume", "agent.rotate_key"]
    .map((x) => h("option", { value: x }, x || "any")));
  const via = h("select#audit-by", h("option", { value: "" }, "any"),
    h("option", { value: "gateway" }, "gateway calls"), h("option", { value: "mcp" }, "MCP calls"));
  const rows = h("tbody");
  const more = h("button", { type: "button" }, "Older events");
  let oldest = null;
  let generation = 0;
  const loadAudit = async (reset) => {
    // Only the latest request's answer is shown: filters may change while one is under way.
    const mine = ++generation;
    if (reset) oldest = Number.MAX_SAFE_INTEGER;
    const q = new URLSearchParams({ agent: handle, before: String(oldest), limit: String(AUDIT_PAGE) });
    if (outcome.value) q.set("outcome", outcome.value);
    if (action.value) q.set("action", action.value);
    if (via.value) q.set("by", via.value);
    try {
      const r = await api("GET", "/v1/audit?" + q);
      if (mine !== generation) return;
      if (reset) clear(rows);
      for (const e of r.events) {
        rows.append(h("tr", { "data-seq": String(e.seq) },
          h("td.num", String(e.seq)), h("td", when(e.at)), h("td", e.action), h("td", e.outcome),
          h("td", e.reason ?? ""), h("td.mono", e.scope ?? ""), h("td.num", e.amount ? "$" + e.amount : ""),
          h("td", e.detail?.by ?? "")));
        oldest = e.seq;
      }
      more.hidden = r.events.length < AUDIT_PAGE;
      if (!rows.children.length) rows.append(h("tr", h("td.empty", { colspan: "8" }, "No event matches.")));
    } catch (e) {
      if (mine !== generation) return;
      if (reset) clear(rows);
      rows.append(h("tr", h("td.error", { colspan: "8" }, e.message)));
    }
  };
  for (const s of [outcome, action, via]) s.addEventListener("change", () => loadAudit(true));
  more.addEventListener("click", () => loadAudit(false));
  clear(audit,
    h("div.toolbar",
      h("div.field", h("label", { for: "audit-outcome" }, "Outcome"), outcome),
      h("div.field", h("label", { for: "audit-action" }, "Action"), action),
      h("div.field", h("label", { for: "audit-by" }, "Made through"), via)),
    h("table#audit", { "aria-label": "Audit events, newest first" },
      h("thead", h("tr", ["Seq", "At", "Action", "Outcome", "Reason", "Scope", "Amount", "Via"].map((c) => h("th", { scope: "col" }, c)))),
      rows),
    more);

  draw();
  if (!fleet.agents.has(handle) && fleet.loaded) refetch([handle]).catch(() => {});
  loadChart();
  loadAudit(true);
  // Redraw on live changes to this agent or its subtree; refresh the chart every 10 s.
  const off = onChange((changed) => {
    if (!root.isConnected || shownVersion === fleet.version) return;
    if (changed === null || changed.has(handle) || children(handle).some((c) => changed.has(c))) draw();
  });
  const every = setInterval(() => { if (root.isConnected) loadChart(); }, 10000);
  return () => { off(); clearInterval(every); };
}
