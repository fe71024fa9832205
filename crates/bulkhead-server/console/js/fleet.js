// The fleet page: every agent in one virtualised table (only the rows in view are in the DOM),
// searched, filtered and sorted in memory, updated live.

import { fleet, onChange } from "./live.js";
import { agentLink, badge, clear, h, money, utilBar } from "./ui.js";

const ROW = 35; // px: the height of one row (td height 34 + 1 border), see console.css
const OVERSCAN = 10;

const COLUMNS = [
  { key: "handle", label: "Agent", get: (a) => a.handle },
  { key: "status", label: "Status", get: (a) => a.status },
  { key: "utilization", label: "Utilization", get: (a) => a.usage.utilization },
  { key: "spent", label: "Window spent / cap", num: true, get: (a) => Number(a.usage.window_spent) },
  { key: "tx", label: "Transactions", num: true, get: (a) => a.usage.tx_count },
  { key: "denied", label: "Denials", num: true, get: (a) => a.usage.denied_count },
  { key: "parent", label: "Parent", get: (a) => a.parent ?? "" },
];

// Kept across visits to the page within the tab.
const view = { q: "", status: "", min: "0", sort: "utilization", desc: true };

export function renderFleet(root) {
  const search = h("input#fleet-search", { type: "search", placeholder: "handle, parent or label", value: view.q });
  const status = h("select#fleet-status",
    h("option", { value: "" }, "any"), h("option", { value: "active" }, "active"),
    h("option", { value: "suspended" }, "suspended"), h("option", { value: "revoked" }, "revoked"));
  status.value = view.status;
  const min = h("select#fleet-min",
    h("option", { value: "0" }, "any"), h("option", { value: "0.5" }, "50% or more"),
    h("option", { value: "0.8" }, "80% or more"), h("option", { value: "1" }, "at cap"));
  min.value = view.min;
  const summary = h("p.summary#fleet-summary", { role: "status" });
  const head = h("tr");
  const tbody = h("tbody");
  const scroller = h("div.scroller#fleet-scroller", { tabindex: "0", "aria-label": "Agents (scrollable)" },
    h("table#fleet-table", { "aria-label": "Agents" }, h("thead", head), tbody));

  clear(root,
    h("h1", "Fleet"),
    h("div.toolbar", { role: "search" },
      h("div.field", h("label", { for: "fleet-search" }, "Search"), search),
      h("div.field", h("label", { for: "fleet-status" }, "Status"), status),
      h("div.field", h("label", { for: "fleet-min" }, "Utilization"), min)),
    summary, scroller);

  let rows = [];

  const drawHead = () => {
    clear(head, COLUMNS.map((c) => {
      const sorted = view.sort === c.key;
      return h("th" + (c.num ? ".num" : ""), { scope: "col", "aria-sort": sorted ? (view.desc ? "descending" : "ascending") : "none" },
        h("button", { type: "button", on: { click: () => { view.desc = sorted ? !view.desc : c.key !== "handle" && c.key !== "parent"; view.sort = c.key; drawHead(); recompute(); } } },
          c.label + (sorted ? (view.desc ? " ▼" : " ▲") : "")));
    }));
  };

  const recompute = () => {
    const q = view.q.trim().toLowerCase();
    const minU = Number(view.min);
    const col = COLUMNS.find((c) => c.key === view.sort) ?? COLUMNS[0];
    rows = [];
    let hot = 0, suspended = 0, revoked = 0;
    for (const a of fleet.agents.values()) {
      if (a.status === "suspended") suspended++;
      if (a.status === "revoked") revoked++;
      if (a.status === "active" && a.usage.utilization >= 0.8) hot++;
      if (view.status && a.status !== view.status) continue;
      if (a.usage.utilization < minU) continue;
      if (q && !(a.handle.includes(q) || (a.parent ?? "").includes(q) ||
        Object.values(a.labels ?? {}).some((v) => String(v).toLowerCase().includes(q)))) continue;
      rows.push(a);
    }
    const dir = view.desc ? -1 : 1;
    rows.sort((x, y) => {
      const a = col.get(x), b = col.get(y);
      return (a < b ? -1 : a > b ? 1 : 0) * dir || (x.handle < y.handle ? -1 : 1);
    });
    const total = fleet.agents.size;
    summary.textContent = `${total.toLocaleString("en")} agents` +
      (rows.length !== total ? ` · ${rows.length.toLocaleString("en")} shown` : "") +
      ` · ${hot} at 80% or more · ${suspended} suspended · ${revoked} revoked` +
      (fleet.loaded ? "" : " · loading…");
    draw();
  };

  const row = (a) => {
    const u = a.usage;
    const tr = h("tr", { "data-handle": a.handle },
      h("td", agentLink(a.handle)),
      h("td", badge(a.status)),
      h("td", utilBar(u.utilization)),
      h("td.num", `${money(u.window_spent)} / ${money(a.spending_cap)}`),
      h("td.num", String(u.tx_count)),
      h("td.num", String(u.denied_count)),
      h("td", a.parent ? agentLink(a.parent) : h("span.muted", "—")));
    if (a.status === "active" && u.utilization >= 1) tr.classList.add("capped");
    else if (a.status === "active" && u.utilization >= 0.8) tr.classList.add("hot");
    return tr;
  };

  const pad = (px) => {
    const td = h("td", { colspan: String(COLUMNS.length) });
    td.style.height = px + "px";
    return h("tr.pad", { "aria-hidden": "true" }, td);
  };

  const draw = () => {
    if (!rows.length) {
      clear(tbody, h("tr", h("td.empty", { colspan: String(COLUMNS.length) }, fleet.loaded ? "No agent matches." : "Loading…")));
      return;
    }
    const first = Math.max(0, Math.floor(scroller.scrollTop / ROW) - OVERSCAN);
    const count = Math.ceil((scroller.clientHeight || 600) / ROW) + 2 * OVERSCAN;
    const last = Math.min(rows.length, first + count);
    clear(tbody, pad(first * ROW), rows.slice(first, last).map(row), pad((rows.length - last) * ROW));
  };

  let pending = false;
  scroller.addEventListener("scroll", () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; draw(); });
  });
  search.addEventListener("input", () => { view.q = search.value; recompute(); });
  status.addEventListener("change", () => { view.status = status.value; recompute(); });
  min.addEventListener("change", () => { view.min = min.value; recompute(); });

  // Live updates arrive up to every page load and poll; redraw at most every 200 ms.
  let queued = false;
  const off = onChange(() => {
    if (queued) return;
    queued = true;
    setTimeout(() => { queued = false; if (root.isConnected) recompute(); }, fleet.loaded ? 200 : 50);
  });
  drawHead();
  recompute();
  return off;
}
