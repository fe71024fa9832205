#!/usr/bin/env bash
# The whole test suite: formatting, lints, every Rust test on SQLite and PostgreSQL, the README's
# first command, the Python SDK with its framework integrations, the TypeScript SDK with Mastra,
# and the web console in headless Chromium. Starts (or installs) PostgreSQL, Chromium, Node 22
# and the Python venvs when they are missing, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
suite_started=$(date +%s)

# Compiled artefacts live outside the checkout, so a fresh clone reuses what an earlier run built
# (the dependencies; the workspace's own crates are rebuilt). Set CARGO_TARGET_DIR to choose.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bulkhead/target}"
export BULKHEAD_BIN="${BULKHEAD_BIN:-$CARGO_TARGET_DIR/debug/bulkhead}"

# The PostgreSQL server the tests create throwaway databases on (without it, the PostgreSQL tests
# skip, or fail under CI). With trust auth the password is ignored; on a fresh install we set it,
# so one URL fits both.
export BULKHEAD_TEST_DATABASE_URL="${BULKHEAD_TEST_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}"

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    return
  fi
  echo "== PostgreSQL is not answering on 127.0.0.1:5432; starting it"
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "== installing PostgreSQL"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 60); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 1
  done
  pg_isready -h 127.0.0.1 -p 5432
  su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\"" || true
}

ensure_postgres
# Drop throwaway databases left by earlier runs.
psql "$BULKHEAD_TEST_DATABASE_URL" -qAt -c "SELECT datname FROM pg_database WHERE datname LIKE 'bh\_t\_%'" |
  while read -r db; do psql "$BULKHEAD_TEST_DATABASE_URL" -q -c "DROP DATABASE IF EXISTS \"$db\"" || true; done
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test (SQLite and PostgreSQL)"
cargo test --workspace --locked
echo "== README quick start: cargo run -- demo (debug build, the same command otherwise)"
cargo run --locked -q -- demo >"$CARGO_TARGET_DIR/demo.out" 2>&1 || { cat "$CARGO_TARGET_DIR/demo.out"; exit 1; }
grep -q "audit chain intact" "$CARGO_TARGET_DIR/demo.out" || { cat "$CARGO_TARGET_DIR/demo.out"; exit 1; }
echo "== Python SDK and framework integrations"
bash scripts/test-python.sh
echo "== TypeScript SDK and Mastra"
bash scripts/test-typescript.sh
echo "== Web console"
bash scripts/test-console.sh
echo "== the whole suite passed in $(( $(date +%s) - suite_started )) s"
