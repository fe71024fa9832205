// A real `bulkhead serve` for tests: a throwaway data directory, a free loopback port.
// The binary is $BULKHEAD_BIN, else target/debug/bulkhead at the repository's root.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const ADMIN_TOKEN = "test-admin-token-0123456789abcdefghijklmnop";

export function binary() {
  const path = process.env.BULKHEAD_BIN || join(REPO, "target", "debug", "bulkhead");
  if (!existsSync(path)) throw new Error(`${path} is missing: build it with \`cargo build --bins\` at ${REPO}`);
  return path;
}

export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

/** Polls `fn` until it returns a truthy value (returned) or `timeoutMs` passes (throws). */
export async function waitFor(fn, { timeoutMs = 10_000, intervalMs = 25, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/**
 * Starts `bulkhead serve`; `await server.stop()` ends it (SIGTERM) and removes its data.
 * Every inherited BULKHEAD_* variable is removed first, so the arguments decide.
 */
export async function startServer({ config, env = {}, adminToken = ADMIN_TOKEN } = {}) {
  const root = mkdtempSync(join(tmpdir(), "bulkhead-ts-test-"));
  const data = join(root, "data");
  const logPath = join(root, "serve.log");
  const args = ["serve", "--data", data];
  if (config !== undefined) {
    writeFileSync(join(root, "bulkhead.toml"), config);
    args.push("--config", join(root, "bulkhead.toml"));
  }
  const childEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("BULKHEAD_")));
  Object.assign(childEnv, { BULKHEAD_ADMIN_TOKEN: adminToken, RUST_LOG: "info" }, env);
  let lastError;
  for (let attempt = 0; attempt < 8; attempt++) {
    const port = await freePort();
    const url = `http://127.0.0.1:${port}`;
    const log = openSync(logPath, "w");
    const proc = spawn(binary(), [...args, "--listen", `127.0.0.1:${port}`], {
      env: childEnv,
      stdio: ["ignore", log, log],
    });
    let exited = false;
    proc.once("exit", () => {
      exited = true;
    });
    try {
      await waitFor(
        async () => {
          if (exited) throw new Error(`bulkhead serve exited:\n${readFileSync(logPath, "utf8")}`);
          try {
            const r = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(1000) });
            return r.status === 200;
          } catch {
            return false;
          }
        },
        { timeoutMs: 30_000, what: "bulkhead serve /healthz" },
      );
    } catch (e) {
      lastError = e;
      if (!exited) proc.kill("SIGKILL");
      continue;
    }
    return {
      url,
      adminToken,
      dataDir: data,
      logs: () => readFileSync(logPath, "utf8"),
      async stop() {
        if (!exited) {
          const done = new Promise((r) => proc.once("exit", r));
          proc.kill("SIGTERM");
          const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
          await done;
          clearTimeout(timer);
        }
        rmSync(root, { recursive: true, force: true });
      },
    };
  }
  throw lastError;
}

let counter = 0;
/** A handle no other test uses. */
export function uniqueHandle(prefix = "agent") {
  counter += 1;
  return `${prefix}-${process.pid}-${counter}-${Math.random().toString(36).slice(2, 8)}`;
}
