// The alerts page: who needs attention now, what this tab saw happen live, and the alerts the
// server raised for its webhooks.

import { api } from "./api.js";
import { attention, fleet, onChange } from "./live.js";
import { agentLink, badge, clear, h, utilBar, when } from "./ui.js";

export function renderAlerts(root) {
  const now = h("div");
  const seen = h("div");
  const hooks = h("div", h("p.muted", "Loading…"));
  clear(root, h("h1", "Alerts"),
    h("section.card", { "aria-labelledby": "att-h" }, h("h2#att-h", "Needs attention now"), now),
    h("section.card", { "aria-labelledby": "seen-h" }, h("h2#seen-h", "Seen live in this tab"), seen),
    h("section.card", { "aria-labelledby": "hooks-h" }, h("h2#hooks-h", "Alerts raised for webhooks"), hooks));

  const draw = () => {
    const list = attention().slice(0, 500);
    clear(now, list.length
      ? h("table#attention", { "aria-label": "Agents needing attention" },
        h("thead", h("tr", ["Agent", "Status", "Utilization", "Parent"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", list.map((a) => h("tr", h("td", agentLink(a.handle)), h("td", badge(a.status)),
          h("td", utilBar(a.usage.utilization)), h("td", a.parent ? agentLink(a.parent) : "—")))))
      : h("p.muted", fleet.loaded ? "No agent is at 80% of its cap or suspended." : "Loading…"));
    clear(seen, fleet.feed.length
      ? h("ul#feed", fleet.feed.slice(0, 100).map((f) => h("li", when(f.at), " · ", agentLink(f.agent), " ", f.text)))
      : h("p.muted", "Nothing yet: crossings of 80%, caps reached, suspensions and revocations appear here as they happen."));
  };
  draw();
  const off = onChange(() => root.isConnected && draw());

  api("GET", "/v1/alerts?limit=100").then((r) => {
    if (!root.isConnected) return;
    clear(hooks, r.alerts.length
      ? h("table", { "aria-label": "Webhook alerts" },
        h("thead", h("tr", ["When", "Type", "Agent", "Delivered"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", r.alerts.map((a) => h("tr", h("td", when(a.alert.at)), h("td", a.alert.type),
          h("td", a.alert.agent ? agentLink(a.alert.agent) : ""), h("td", a.delivered ? "yes" : `not yet (${a.attempts} attempts)`)))))
      : h("p.muted", "None. The server raises these only when [alerts] webhooks are configured."));
  }, (e) => clear(hooks, h("p.error", e.message)));
  return off;
}
