// Every action an operator can take, each behind a dialog that names what it affects.
// Dialogs are native <dialog>s: focus stays inside, Escape cancels, Enter confirms.

import { api, enc } from "./api.js";
import { fleet, refetch, subtree } from "./live.js";
import { clear, h, money, toast } from "./ui.js";

const dialog = () => document.getElementById("dialog");

/**
 * Shows a form in the dialog. `fields` are nodes; `submit(form)` runs on confirm and may throw
 * (its message is shown and the dialog stays open); resolves to its result, or null if cancelled.
 */
function open({ title, body, confirm, danger = false, submit }) {
  const d = dialog();
  return new Promise((resolve) => {
    const error = h("p.error", { role: "alert" });
    const ok = h("button" + (danger ? ".danger" : ".primary"), { type: "submit" }, confirm);
    const cancel = h("button", { type: "button", on: { click: () => d.close() } }, "Cancel");
    let result = null;
    const form = h("form", { novalidate: true, on: { submit: async (ev) => {
      ev.preventDefault();
      ok.disabled = true;
      error.textContent = "";
      try {
        result = await submit(form);
        d.close();
      } catch (e) {
        error.textContent = e.message;
        ok.disabled = false;
      }
    } } }, h("h2#dialog-title", title), body, error, h("div.buttons", cancel, ok));
    clear(d, form);
    d.addEventListener("close", () => resolve(result), { once: true });
    d.showModal();
    const first = form.querySelector("input, select, textarea");
    (first ?? ok).focus();
  });
}

const field = (id, label, input, hint) =>
  h("div.field", h("label", { for: id }, label), input, hint ? h("span.hint", { id: id + "-hint" }, hint) : null);

/** Shows a new key once, with a Copy button; it is never stored anywhere. */
function showKey(handle, key, what) {
  const d = dialog();
  const copy = h("button.primary", { type: "button" }, "Copy");
  // The key leaves the page the moment Done is pressed (a dialog's `close` event comes a task later).
  const done = h("button", { type: "button", on: { click: () => { clear(d); d.close(); } } }, "Done");
  const status = h("p.hint", { role: "status" });
  copy.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(key);
      status.textContent = "Copied.";
    } catch {
      const r = document.createRange();
      r.selectNodeContents(keyEl);
      getSelection().removeAllRanges();
      getSelection().addRange(r);
      status.textContent = "Selected: press Ctrl+C to copy.";
    }
  });
  const keyEl = h("p.key#new-key", key);
  clear(d, h("h2#dialog-title", `${what} for ${handle}`),
    h("p", "This key is shown this once and never again. Give it to the agent now."),
    keyEl, status, h("div.buttons", done, copy));
  d.addEventListener("close", () => clear(d), { once: true });
  d.showModal();
  copy.focus();
}

function scopesOf(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

export async function createAgent() {
  const handle = h("input#new-handle", { required: true, autocomplete: "off", spellcheck: false, "aria-describedby": "new-handle-hint" });
  const scopes = h("input#new-scopes", { required: true, placeholder: "payments:write invoices:read" });
  const cap = h("input#new-cap", { required: true, inputmode: "decimal", placeholder: "50.00" });
  const win = h("input#new-window", { value: "24h" });
  const perTx = h("input#new-per-tx", { inputmode: "decimal", placeholder: "defaults to the cap" });
  const lifetime = h("input#new-lifetime", { inputmode: "decimal", placeholder: "none" });
  const r = await open({
    title: "New agent",
    confirm: "Create agent",
    body: [
      field("new-handle", "Handle", handle, "1–64 of a-z 0-9 . _ -"),
      field("new-scopes", "Scopes", scopes, "separated by spaces or commas"),
      field("new-cap", "Spending cap", cap),
      field("new-window", "Window", win),
      field("new-per-tx", "Per-transaction limit", perTx),
      field("new-lifetime", "Lifetime cap", lifetime),
    ],
    submit: async () => {
      const body = { handle: handle.value.trim(), scopes: scopesOf(scopes.value), spending_cap: cap.value.trim(), window: win.value.trim() || "24h" };
      if (perTx.value.trim()) body.per_tx_limit = perTx.value.trim();
      if (lifetime.value.trim()) body.lifetime_cap = lifetime.value.trim();
      return api("POST", "/v1/agents", body);
    },
  });
  if (!r) return;
  const { key, ...agent } = r;
  fleet.agents.set(agent.handle, agent);
  refetch([agent.handle]);
  location.hash = "#/agent/" + enc(agent.handle);
  showKey(agent.handle, key, "Key");
}

export async function editAgent(a) {
  const cap = h("input#edit-cap", { value: a.spending_cap, inputmode: "decimal" });
  const win = h("input#edit-window", { value: a.window });
  const perTx = h("input#edit-per-tx", { value: a.per_tx_limit, inputmode: "decimal" });
  const lifetime = h("input#edit-lifetime", { value: a.lifetime_cap ?? "", placeholder: "none", inputmode: "decimal" });
  const scopes = h("input#edit-scopes", { value: a.scopes.join(" ") });
  const r = await open({
    title: `Change caps and scopes of ${a.handle}`,
    confirm: "Save changes",
    body: [
      h("p.hint", "Takes effect at the next request of this agent and of every descendant it binds."),
      field("edit-cap", "Spending cap", cap),
      field("edit-window", "Window", win),
      field("edit-per-tx", "Per-transaction limit", perTx),
      field("edit-lifetime", "Lifetime cap", lifetime, "empty: no lifetime cap"),
      field("edit-scopes", "Scopes", scopes),
    ],
    submit: async () => {
      const patch = {};
      if (cap.value.trim() !== a.spending_cap) patch.spending_cap = cap.value.trim();
      if (win.value.trim() !== a.window) patch.window = win.value.trim();
      if (perTx.value.trim() !== a.per_tx_limit) patch.per_tx_limit = perTx.value.trim();
      const lt = lifetime.value.trim() || null;
      if (lt !== a.lifetime_cap) patch.lifetime_cap = lt;
      const sc = scopesOf(scopes.value);
      if (sc.join(" ") !== a.scopes.join(" ")) patch.scopes = sc;
      if (!Object.keys(patch).length) return a;
      return api("PATCH", `/v1/agents/${enc(a.handle)}`, patch);
    },
  });
  if (r) {
    fleet.agents.set(r.handle, r);
    toast(`Saved ${r.handle}.`);
    await refetch([r.handle]);
  }
}

function affected(handles) {
  return h("ul.affected#affected", { "aria-label": "Affected agents" }, handles.map((x) => h("li", x)));
}

export async function revokeAgent(a) {
  const all = subtree(a.handle);
  const reason = h("input#revoke-reason", { placeholder: "e.g. runaway loop" });
  const r = await open({
    title: `Revoke ${a.handle}?`,
    confirm: all.length > 1 ? `Revoke ${all.length} agents` : "Revoke agent",
    danger: true,
    body: [
      h("p", all.length > 1
        ? `This revokes ${a.handle} and everything it spawned: ${all.length} agents in all. Their keys stop working at once, on every server, and cannot be restored.`
        : `The key of ${a.handle} stops working at once, on every server, and cannot be restored.`),
      affected(all),
      field("revoke-reason", "Reason", reason),
    ],
    submit: () => api("POST", `/v1/agents/${enc(a.handle)}/revoke`, { reason: reason.value.trim() || "revoked from the console" }),
  });
  if (r) {
    toast(`Revoked ${r.revoked.length} agent${r.revoked.length > 1 ? "s" : ""}.`);
    await refetch(r.revoked);
  }
}

export async function suspendAgent(a) {
  const all = subtree(a.handle);
  const reason = h("input#suspend-reason", { placeholder: "e.g. investigating spend" });
  const r = await open({
    title: `Suspend ${a.handle}?`,
    confirm: "Suspend",
    danger: true,
    body: [
      h("p", `Every request of ${a.handle}${all.length > 1 ? ` and of its ${all.length - 1} descendants` : ""} is refused until it is resumed.`),
      affected(all),
      field("suspend-reason", "Reason", reason),
    ],
    submit: () => api("POST", `/v1/agents/${enc(a.handle)}/suspend`, { reason: reason.value.trim() || "suspended from the console" }),
  });
  if (r) toast(`Suspended ${a.handle}.`);
  if (r) await refetch(all);
  return r;
}

export async function resumeAgent(a) {
  const r = await open({
    title: `Resume ${a.handle}?`,
    confirm: "Resume",
    body: [h("p", `${a.handle} may make requests again, within its caps.`)],
    submit: () => api("POST", `/v1/agents/${enc(a.handle)}/resume`, {}),
  });
  if (r) {
    toast(`Resumed ${a.handle}.`);
    await refetch(subtree(a.handle));
  }
}

export async function rotateKey(a) {
  const r = await open({
    title: `Rotate the key of ${a.handle}?`,
    confirm: "Rotate key",
    danger: true,
    body: [h("p", `The current key of ${a.handle} stops working at once; a new one is shown once. Its children keep their own keys.`)],
    submit: () => api("POST", `/v1/agents/${enc(a.handle)}/keys`, {}),
  });
  if (r) showKey(a.handle, r.key, "New key");
}

export { money };
