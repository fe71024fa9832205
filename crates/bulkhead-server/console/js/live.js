// The fleet as this tab knows it, kept fresh without reloading.
//
// Loading: every agent, a page of 1000 at a time (`GET /v1/agents?limit=1000&after=`), each
// page shown as it arrives. Staying fresh: every 2 s the fleet's audit trail after the last seq
// seen (`GET /v1/audit?after=`) names the agents something happened to; those and their
// ancestors (whose usage includes them) are fetched again one by one, or, when more than
// REFETCH_MAX changed at once, the whole list is. A full reload every minute catches what no
// event announces (a window that reset).

import { api, enc } from "./api.js";

const PAGE = 1000;
const POLL_MS = 2000;
const FULL_RELOAD_MS = 60000;
const REFETCH_MAX = 200;
const FEED_MAX = 200;

export const fleet = {
  agents: new Map(),
  loaded: false,
  head: 0,
  version: 0,
  /** Notable things seen live, newest first: {at, agent, kind, text}. */
  feed: [],
  lastOk: 0,
  error: null,
};

const listeners = new Set();
let timer = null;
let running = false;
let lastFull = 0;
let childIndex = null;
let childIndexVersion = -1;

export function onChange(f) {
  listeners.add(f);
  return () => listeners.delete(f);
}

function notify(handles) {
  fleet.version++;
  for (const f of [...listeners]) {
    try { f(handles); } catch (e) { console.error(e); }
  }
}

/** Starts loading and polling (once per login). */
export async function start() {
  if (running) return;
  running = true;
  fleet.agents.clear();
  fleet.feed = [];
  fleet.loaded = false;
  try {
    const first = await api("GET", "/v1/audit?limit=1&before=9007199254740991");
    fleet.head = first.head;
    await loadAll();
  } catch (e) {
    fleet.error = e;
    notify(null);
  }
  schedule();
}

export function stop() {
  running = false;
  clearTimeout(timer);
  fleet.agents.clear();
  fleet.loaded = false;
}

function schedule() {
  clearTimeout(timer);
  if (running) timer = setTimeout(tick, POLL_MS);
}

async function tick() {
  try {
    if (Date.now() - lastFull > FULL_RELOAD_MS) await loadAll();
    else await poll();
    fleet.error = null;
    fleet.lastOk = Date.now();
  } catch (e) {
    fleet.error = e;
  }
  notify(new Set());
  schedule();
}

export async function loadAll() {
  lastFull = Date.now();
  let after = "";
  const seen = new Set();
  for (;;) {
    const page = await api("GET", `/v1/agents?limit=${PAGE}` + (after ? `&after=${enc(after)}` : ""));
    const changed = new Set();
    for (const a of page.agents) {
      seen.add(a.handle);
      upsert(a, changed);
    }
    if (page.agents.length < PAGE) break;
    after = page.agents[page.agents.length - 1].handle;
    notify(changed);
  }
  for (const h of [...fleet.agents.keys()]) if (!seen.has(h)) fleet.agents.delete(h);
  fleet.loaded = true;
  fleet.lastOk = Date.now();
  notify(null);
}

async function poll() {
  const touched = new Set();
  for (;;) {
    const r = await api("GET", `/v1/audit?after=${fleet.head}&limit=${PAGE}`);
    for (const e of r.events) {
      touched.add(e.agent);
      note(e);
    }
    if (r.events.length) fleet.head = r.events[r.events.length - 1].seq;
    if (r.events.length < PAGE) break;
  }
  if (!touched.size) return;
  for (const h of [...touched]) for (const a of ancestors(h)) touched.add(a);
  if (touched.size > REFETCH_MAX) return loadAll();
  await refetch([...touched]);
}

/** Fetches these agents again (a few at a time) and tells the listeners. */
export async function refetch(handles) {
  const changed = new Set();
  const queue = [...handles];
  const worker = async () => {
    while (queue.length) {
      const h = queue.shift();
      try {
        upsert(await api("GET", `/v1/agents/${enc(h)}`), changed);
      } catch (e) {
        if (e.status !== 404) throw e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(8, queue.length) }, worker));
  notify(changed);
}

function upsert(a, changed) {
  const old = fleet.agents.get(a.handle);
  fleet.agents.set(a.handle, a);
  changed.add(a.handle);
  if (old && fleet.loaded) {
    const u0 = old.usage.utilization, u1 = a.usage.utilization;
    if (u0 < 0.8 && u1 >= 0.8) push(a.handle, "threshold", `crossed 80% of its cap (${Math.round(u1 * 100)}%)`);
    if (u0 < 1 && u1 >= 1) push(a.handle, "cap", "reached its cap");
    if (old.status !== a.status) push(a.handle, a.status, `is now ${a.status}`);
  }
}

function note(e) {
  if (e.outcome === "denied" && /cap_exceeded$/.test(e.reason ?? "")) {
    const last = fleet.feed[0];
    if (!(last && last.agent === e.agent && last.kind === "denied")) push(e.agent, "denied", `denied: ${e.reason}`);
  }
}

function push(agent, kind, text) {
  fleet.feed.unshift({ at: new Date().toISOString(), agent, kind, text });
  if (fleet.feed.length > FEED_MAX) fleet.feed.length = FEED_MAX;
}

export function ancestors(handle) {
  const out = [];
  let a = fleet.agents.get(handle);
  while (a && a.parent && out.length < 64) {
    out.push(a.parent);
    a = fleet.agents.get(a.parent);
  }
  return out;
}

/** parent handle -> child handles, rebuilt when the fleet changed. */
export function children(handle) {
  if (childIndexVersion !== fleet.version) {
    childIndex = new Map();
    for (const a of fleet.agents.values()) {
      if (!a.parent) continue;
      if (!childIndex.has(a.parent)) childIndex.set(a.parent, []);
      childIndex.get(a.parent).push(a.handle);
    }
    for (const v of childIndex.values()) v.sort();
    childIndexVersion = fleet.version;
  }
  return childIndex.get(handle) ?? [];
}

/** The agent and every descendant, depth first. */
export function subtree(handle) {
  const out = [];
  const walk = (h) => {
    out.push(h);
    for (const c of children(h)) walk(c);
  };
  walk(handle);
  return out;
}

/** Agents needing attention now. */
export function attention() {
  const out = [];
  for (const a of fleet.agents.values()) {
    if (a.status === "suspended") out.push(a);
    else if (a.status === "active" && a.usage.utilization >= 0.8) out.push(a);
  }
  return out.sort((x, y) => y.usage.utilization - x.usage.utilization);
}
