#!/usr/bin/env bash
# Benchmark of the Python SDK: client.spend against a bare keep-alive httpx GET /healthz and POST
# /v1/spend of the same release server (p50/p99 of sequential calls), and spends/s from 32 threads
# sharing one client, with the ledger checked exact afterwards.
#
#   bash scripts/bench-python.sh
#   N=5000 PER_THREAD=500 bash scripts/bench-python.sh      # longer runs
#   bash scripts/bench-python.sh -n 300 --per-thread 20     # a smoke run (arguments go to bench_spend.py)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/python-venv.sh
source scripts/python-venv.sh

BIN=${BULKHEAD_BIN:-target/release/bulkhead} # BULKHEAD_BIN: measure another build, as it is
if [ -z "${BULKHEAD_BIN:-}" ]; then
  stale=""
  if [ -x "$BIN" ]; then
    stale=$(find crates Cargo.toml Cargo.lock -newer "$BIN" -type f -print -quit)
  fi
  if [ ! -x "$BIN" ] || [ -n "$stale" ]; then
    echo "== cargo build --release (${stale:+$stale is newer than $BIN}${stale:-$BIN is missing})"
    cargo build --release --locked -p bulkhead
  fi
fi
BIN=$(realpath "$BIN")

echo "== SDK venv"
VENV=$(sdk_venv_path)
ensure_venv "$VENV" "$DEV_REQS"
install_sdk "$VENV"

echo "== bench: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
BULKHEAD_BIN=$BIN "$VENV/bin/python" sdk/python/bench/bench_spend.py "$@"
