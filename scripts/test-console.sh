#!/usr/bin/env bash
# The web console's end-to-end tests: a real `bulkhead serve`, a real headless Chromium (Debian's
# `chromium`, driven by playwright-core). Installs what is missing: Chromium through apt, the
# test runner's one dependency through `npm ci`. Screenshots of every page go to
# target/console-screenshots/.
#
# `BULKHEAD_BIN` overrides the debug binary the tests run. The fleet of 10,000 agents is measured
# by scripts/bench-console.sh (a benchmark that prints figures).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

echo "== console: browser tests (headless Chromium against a real server)"
if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  echo "== installing Chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi
tests=crates/bulkhead-server/console/tests
if [ ! -d "$tests/node_modules/playwright-core" ] || [ "$tests/package-lock.json" -nt "$tests/node_modules/.package-lock.json" ]; then
  (cd "$tests" && npm ci --no-audit --no-fund --silent)
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
export BULKHEAD_BIN="${BULKHEAD_BIN:-$target/debug/bulkhead}"
if [ ! -x "$BULKHEAD_BIN" ]; then
  cargo build --locked -p bulkhead
fi
(cd "$tests" && node --test --test-concurrency=1 console.test.mjs)

echo "== console tests done in $(( $(date +%s) - started )) s; screenshots in target/console-screenshots/"
