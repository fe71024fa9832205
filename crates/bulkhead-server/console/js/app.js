// The console's shell: log in (the admin token goes to sessionStorage and nowhere else), route
// between pages by the URL's hash, show whether the live view is current.

import { api, clearToken, setToken, token, whenUnauthorized } from "./api.js";
import { createAgent } from "./actions.js";
import { renderAgent } from "./agent.js";
import { renderAlerts } from "./alerts.js";
import { renderBlast } from "./blast.js";
import { renderFleet } from "./fleet.js";
import { attention, fleet, onChange, start, stop } from "./live.js";
import { clear, h } from "./ui.js";

const $ = (id) => document.getElementById(id);
let leave = null;

function showLogin(message) {
  stop();
  if (leave) { leave(); leave = null; }
  for (const id of ["nav", "live", "logout", "new-agent"]) $(id).hidden = true;
  clear($("page"));
  $("login").hidden = false;
  $("login-error").textContent = message ?? "";
  $("token").value = "";
  $("token").focus();
}

async function logIn(t) {
  // Any admin-only read tells a good token from a bad one.
  await api("GET", "/v1/audit?limit=1&before=1", undefined, t);
  setToken(t);
}

function enter() {
  $("login").hidden = true;
  for (const id of ["nav", "live", "logout", "new-agent"]) $(id).hidden = false;
  start();
  route();
}

async function route() {
  if (!token()) return;
  if (leave) { leave(); leave = null; }
  const page = $("page");
  const hash = location.hash || "#/fleet";
  const [, name, arg] = /^#\/([a-z]+)(?:\/(.*))?$/.exec(hash) ?? [null, "fleet"];
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (name === "agent" && arg) {
      document.title = `${decodeURIComponent(arg)} · Bulkhead`;
      leave = renderAgent(page, decodeURIComponent(arg));
    } else if (name === "blast") {
      document.title = "Blast radius · Bulkhead";
      leave = null;
      await renderBlast(page);
    } else if (name === "alerts") {
      document.title = "Alerts · Bulkhead";
      leave = renderAlerts(page);
    } else {
      document.title = "Fleet · Bulkhead";
      leave = renderFleet(page);
    }
  } catch (e) {
    clear(page, h("p.error", { role: "alert" }, e.message));
  }
  const heading = page.querySelector("h1");
  if (heading && document.activeElement === document.body) $("main").focus({ preventScroll: true });
}

function liveStatus() {
  const el = $("live");
  const n = attention().length;
  $("alert-count").hidden = n === 0;
  $("alert-count").textContent = String(n);
  $("alert-count").setAttribute("aria-label", `${n} agents need attention`);
  if (fleet.error) {
    el.textContent = `Not current: ${fleet.error.message}`;
    el.classList.add("stale");
  } else if (fleet.lastOk) {
    el.textContent = `Live · ${new Date(fleet.lastOk).toISOString().slice(11, 19)} UTC`;
    el.classList.remove("stale");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  whenUnauthorized(() => { clearToken(); showLogin("The admin token was refused; log in again."); });
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) { $("login-error").textContent = "Enter the admin token."; return; }
    try {
      await logIn(t);
      $("token").value = "";
      enter();
    } catch (e) {
      $("login-error").textContent = e.status === 401 ? "That is not the admin token." : e.message;
    }
  });
  $("logout").addEventListener("click", () => { clearToken(); showLogin(); });
  $("new-agent").addEventListener("click", () => createAgent().catch((e) => console.warn(e)));
  window.addEventListener("hashchange", route);
  onChange(liveStatus);
  if (token()) enter(); else showLogin();
});
