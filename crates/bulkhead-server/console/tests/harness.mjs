// Test support: a real `bulkhead serve` on a free port with a throwaway data dir, a real
// headless Chromium (Debian's, driven by playwright-core), and a page that records every
// request it makes and every error it shows.

import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
export const repo = resolve(here, "../../../..");
export const screenshots = join(repo, "target", "console-screenshots");
mkdirSync(screenshots, { recursive: true });

async function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** Starts `bulkhead serve`; resolves once /healthz answers. */
export async function startServer() {
  const bin = process.env.BULKHEAD_BIN ?? join(repo, "target", "debug", "bulkhead");
  const data = mkdtempSync(join(tmpdir(), "bulkhead-console-"));
  const token = "adm_" + randomBytes(24).toString("hex");
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const child = spawn(bin, ["serve", "--listen", `127.0.0.1:${port}`, "--data", data], {
    env: { ...process.env, BULKHEAD_ADMIN_TOKEN: token, RUST_LOG: "warn" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => { stderr += d; });
  const exited = new Promise((ok) => child.once("exit", ok));
  const deadline = Date.now() + 20000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`bulkhead serve exited: ${stderr}`);
    try {
      if ((await fetch(url + "/healthz")).ok) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`bulkhead serve did not become healthy: ${stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  const call = async (method, path, body, key = token) => {
    const r = await fetch(url + path, {
      method,
      headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const json = await r.json();
    return { status: r.status, json };
  };
  return {
    url, token, port, call,
    async admin(method, path, body) {
      const r = await call(method, path, body);
      if (r.status >= 300) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(r.json)}`);
      return r.json;
    },
    async create(spec, key) {
      const r = await call("POST", "/v1/agents", spec, key);
      if (r.status !== 201) throw new Error(`create ${spec.handle}: ${r.status} ${JSON.stringify(r.json)}`);
      return r.json;
    },
    async spend(key, scope, amount) {
      return call("POST", "/v1/spend", { scope, amount }, key);
    },
    async stop() {
      child.kill("SIGTERM");
      await exited;
      rmSync(data, { recursive: true, force: true });
    },
  };
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-quic", "--no-first-run", "--disable-default-apps", "--disable-extensions"],
  });
}

/**
 * A fresh context and page on the console; `problems` collects console errors, page errors and
 * requests to any other origin (checked by `assertClean`).
 */
export async function openConsole(browser, server, { viewport = { width: 1400, height: 900 } } = {}) {
  const context = await browser.newContext({ viewport, serviceWorkers: "block" });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: server.url });
  const page = await context.newPage();
  const problems = [];
  const requests = [];
  const allowed = (u) => u.startsWith(server.url + "/") || u.startsWith("data:") || u === "about:blank";
  context.on("request", (r) => {
    requests.push(r.url());
    if (!allowed(r.url())) problems.push(`request to another host: ${r.url()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()} (${m.location().url})`);
  });
  await page.goto(server.url + "/console");
  return { context, page, problems, requests };
}

/** Logs in through the form with the keyboard. */
export async function logIn(page, token) {
  const field = page.getByLabel("Admin token");
  await field.fill("");
  await field.focus();
  await page.keyboard.type(token);
  await page.keyboard.press("Enter");
  await page.locator("#fleet-table").waitFor();
}

export const shot = (page, name) => page.screenshot({ path: join(screenshots, `${name}.png`), fullPage: true });
