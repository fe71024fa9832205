// The blast-radius page: per agent, what it could spend per period through its ancestors' caps,
// what it may do, and how fast it can be stopped; and the fleet's total per day.

import { api } from "./api.js";
import { agentLink, clear, h, money } from "./ui.js";

export async function renderBlast(root) {
  clear(root, h("h1", "Blast radius"), h("p.summary", { role: "status" }, "Loading…"));
  let after = "";
  const agents = [];
  let doc;
  for (;;) {
    doc = await api("GET", "/v1/blast-radius?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : ""));
    agents.push(...doc.agents);
    if (doc.agents.length < 1000) break;
    after = doc.agents[doc.agents.length - 1].handle;
  }
  if (!root.isConnected) return;
  const flags = (a) => [a.wildcard_scopes && "wildcard scope", a.no_expiry && "no expiry",
    a.no_lifetime_cap && "no lifetime cap", a.shadow_mode && "shadow mode"].filter(Boolean).join(", ");
  const live = agents.filter((a) => a.status !== "revoked");
  clear(root,
    h("h1", "Blast radius"),
    h("p.summary#fleet-total", `Fleet maximum per day: ${money(doc.fleet_max_spend_per_day)} across ${live.length} live agents. ` +
      `Revocation time: ${doc.revocation_ms.toFixed(1)} ms (${doc.revocation_source}).`),
    h("div.scroller", { tabindex: "0", "aria-label": "Blast radius (scrollable)" },
      h("table#blast-table", { "aria-label": "Blast radius per agent" },
        h("thead", h("tr", ["Agent", "Status", "Max spend/period", "Effective max/period", "Effective max/day", "Scopes", "Flags", "Revocation time", "Children"]
          .map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", agents.map((a) => h("tr",
          h("td", agentLink(a.handle)),
          h("td", a.status),
          h("td.num", `${money(a.max_spend_per_period)} / ${a.window}`),
          h("td.num", money(a.effective_max_spend_per_period)),
          h("td.num", money(a.effective_max_spend_per_day)),
          h("td.mono", a.scopes.join(", ")),
          h("td", flags(a)),
          h("td.num", a.revocation_ms < 1000 ? "< 1 second" : `${(a.revocation_ms / 1000).toFixed(1)} s`),
          h("td.num", String(a.children))))))));
}
