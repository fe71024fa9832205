#!/usr/bin/env bash
# The web console with a fleet of 10,000 agents, against an optimised build: prints how long the
# fleet page takes to show its first rows, to list every agent, to answer a search and a sort
# (the goal: each interaction within 1 s), and checks that every row is reachable while only
# the rows in view are drawn. Installs Chromium and the test runner's dependency when missing.
#
#   bash scripts/bench-console.sh        # BULKHEAD_BENCH_BIN: measure another build, as it is
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
tests=crates/bulkhead-server/console/tests
if [ ! -d "$tests/node_modules/playwright-core" ] || [ "$tests/package-lock.json" -nt "$tests/node_modules/.package-lock.json" ]; then
  (cd "$tests" && npm ci --no-audit --no-fund --silent)
fi
if [ -z "${BULKHEAD_BENCH_BIN:-}" ]; then
  cargo build --release --locked -p bulkhead
  BULKHEAD_BENCH_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/bulkhead"
fi
(cd "$tests" && BULKHEAD_BIN="$BULKHEAD_BENCH_BIN" node --test --test-concurrency=1 fleet-10k.test.mjs)
