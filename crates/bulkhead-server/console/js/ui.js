// Small DOM helpers. Text always goes in as text nodes, never as HTML.

/** h("tag.class#id", {attrs, on: {event: f}}, ...children) */
export function h(spec, attrs, ...children) {
  const m = /^([a-z0-9]+)((?:[.#][\w-]+)*)$/i.exec(spec);
  const el = document.createElement(m ? m[1] : spec);
  if (m) for (const part of m[2].match(/[.#][\w-]+/g) ?? []) {
    if (part[0] === ".") el.classList.add(part.slice(1)); else el.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "on") for (const [ev, f] of Object.entries(v)) el.addEventListener(ev, f);
    else if (k === "text") el.textContent = v;
    else if (k in el && !k.startsWith("aria") && !k.startsWith("data") && k !== "for" && k !== "list") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const money = (s) => (s === null || s === undefined ? "none" : "$" + s);
export function pct(u) {
  const v = Math.round(u * 1000) / 10;
  return (Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1)) + "%";
}

export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/Z$/, " UTC");
}

/** A utilization bar with its percentage as text (the bar alone is decoration). */
export function utilBar(u) {
  const fill = h("span.fill");
  fill.style.width = Math.min(100, u * 100).toFixed(1) + "%";
  if (u >= 1) fill.classList.add("over"); else if (u >= 0.8) fill.classList.add("warn");
  return h("span.util", h("span.bar", { "aria-hidden": "true" }, fill), h("span.pct", pct(u)));
}

export const badge = (status) => h("span.badge." + status, status);

let toastTimer;
export function toast(msg) {
  const t = document.getElementById("toast");
  t.textContent = msg;
  t.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.remove("show"), 3500);
}

export const agentLink = (handle) => h("a", { href: "#/agent/" + encodeURIComponent(handle) }, handle);
