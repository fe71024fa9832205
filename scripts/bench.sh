#!/usr/bin/env bash
# Benchmark: durable, audited POST /v1/spend against GET /healthz of the same server, with wrk at
# 32 connections on loopback; then RSS and spend latency with 100,000 agents.
#
#   bash scripts/bench.sh                         # SQLite (embedded store)
#   BENCH_DATABASE_URL=postgres://… bash scripts/bench.sh   # PostgreSQL (a fresh database!)
#   DURATION=20 AGENTS=100000 bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
AGENTS=${AGENTS:-100000}
PORT=${PORT:-18900}
CONNS=${CONNS:-32}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
command -v curl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
echo "== building release binary"
cargo build --release --locked -q -p bulkhead

DIR=$(mktemp -d)
export BENCH_ADMIN="bench-admin-$RANDOM$RANDOM-0123456789abcdefghijklmnop"
B="http://127.0.0.1:$PORT"
args=(serve --listen "127.0.0.1:$PORT" --data "$DIR")
[ -n "${BENCH_DATABASE_URL:-}" ] && args+=(--database-url "$BENCH_DATABASE_URL")
BULKHEAD_ADMIN_TOKEN=$BENCH_ADMIN RUST_LOG=warn ./target/release/bulkhead "${args[@]}" >"$DIR/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 100); do curl -sf "$B/healthz" >/dev/null && break; sleep 0.1; done
store=${BENCH_DATABASE_URL:+PostgreSQL}; store=${store:-SQLite}

create_agent() { # handle -> key
  curl -sf -X POST "$B/v1/agents" -H "Authorization: Bearer $BENCH_ADMIN" \
    -d "{\"handle\":\"$1\",\"scopes\":[\"bench:*\"],\"spending_cap\":\"1000000000\",\"breaker\":{\"denials\":0}}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

run_wrk() { # label url [script] -> prints "rps p50_ms p99_ms"
  local out
  if [ -n "${3:-}" ]; then out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$3" "$2"); else out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$2"); fi
  echo "$out" >"$DIR/wrk-$1.txt"
  if grep -q "Non-2xx" <<<"$out"; then echo "!! $1: non-2xx answers:" >&2; grep "Non-2xx" <<<"$out" >&2; fi
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
print(f"{rps:.0f} {ms('50%'):.3f} {ms('99%'):.3f}")
PY
}

export BENCH_KEY
BENCH_KEY=$(create_agent hot-agent)
echo "== $store store, wrk -t2 -c$CONNS -d${DURATION}s, 2 cores shared by server and wrk"
read -r h_rps h_p50 h_p99 <<<"$(run_wrk healthz "$B/healthz")"
read -r s_rps s_p50 s_p99 <<<"$(run_wrk spend "$B/v1/spend" scripts/bench/spend.lua)"
spent=$(curl -sf "$B/v1/agents/hot-agent" -H "Authorization: Bearer $BENCH_ADMIN" | python3 -c 'import json,sys; u=json.load(sys.stdin)["usage"]; print(u["window_spent"], u["tx_count"])')
printf '%-34s %10s %9s %9s\n' "endpoint" "req/s" "p50 ms" "p99 ms"
printf '%-34s %10s %9s %9s\n' "GET /healthz" "$h_rps" "$h_p50" "$h_p99"
printf '%-34s %10s %9s %9s\n' "POST /v1/spend (durable, audited)" "$s_rps" "$s_p50" "$s_p99"
python3 -c "print(f'spend/healthz throughput ratio: {$s_rps/$h_rps:.2f}')"
echo "hot agent after the run: window_spent tx_count = $spent"

if [ "$AGENTS" -gt 0 ]; then
  echo "== creating $AGENTS agents"
  created=0
  while [ "$created" -lt "$AGENTS" ]; do
    wrk -t2 -c32 -d5s -s scripts/bench/create.lua "$B/v1/agents" >"$DIR/wrk-create.txt"
    n=$(grep -Eo '^\s+[0-9]+ requests' "$DIR/wrk-create.txt" | grep -Eo '[0-9]+')
    created=$((created + n))
    echo "   ... about $created agents"
  done
  rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
  read -r s2_rps s2_p50 s2_p99 <<<"$(run_wrk spend-many "$B/v1/spend" scripts/bench/spend.lua)"
  printf '%-34s %10s %9s %9s\n' "POST /v1/spend with $created agents" "$s2_rps" "$s2_p50" "$s2_p99"
  echo "server RSS with $created agents: $((rss_kb / 1024)) MiB"
fi
