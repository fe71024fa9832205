// A bar chart of spend per bucket, drawn as SVG: bars for money spent, a red tick where
// requests were denied. Each bar carries its figures as a tooltip; the whole chart a summary.

const NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

export function spendChart(buckets, bucketLabel) {
  const W = 800, H = 180, L = 48, B = 20, T = 8;
  const values = buckets.map((b) => Number(b.spent));
  const max = Math.max(...values, 0);
  const total = values.reduce((x, y) => x + y, 0);
  const denied = buckets.reduce((x, b) => x + b.denied, 0);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", preserveAspectRatio: "none" });
  svg.setAttribute("aria-label",
    `Spend per ${bucketLabel} over the last ${buckets.length}: total $${total.toFixed(2)}, peak $${max.toFixed(2)}, ${denied} denied requests.`);
  const top = max > 0 ? max : 1;
  svg.append(el("line", { x1: L, y1: H - B, x2: W, y2: H - B, class: "axis" }));
  svg.append(el("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, "$" + top.toFixed(2)));
  svg.append(el("text", { x: L - 4, y: H - B, "text-anchor": "end" }, "$0"));
  const bw = (W - L) / Math.max(1, buckets.length);
  buckets.forEach((b, i) => {
    const v = values[i];
    const hgt = ((H - B - T) * v) / top;
    const x = L + i * bw;
    const g = el("g", {});
    g.append(el("title", {}, `${b.start}: $${b.spent} spent, ${b.allowed} allowed, ${b.denied} denied`));
    g.append(el("rect", { x: x + 1, y: H - B - hgt, width: Math.max(1, bw - 2), height: Math.max(0, hgt), class: "barr" }));
    if (b.denied > 0) g.append(el("rect", { x: x + 1, y: H - B + 2, width: Math.max(1, bw - 2), height: 4, class: "deny" }));
    svg.append(g);
  });
  const label = (i) => new Date(buckets[i].start).toISOString().slice(5, 16).replace("T", " ");
  if (buckets.length) {
    svg.append(el("text", { x: L, y: H - 4 }, label(0)));
    svg.append(el("text", { x: W, y: H - 4, "text-anchor": "end" }, label(buckets.length - 1)));
  }
  return svg;
}
