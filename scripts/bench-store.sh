#!/usr/bin/env bash
# Store benchmark: durable spends/s and p99 for one hot agent and for many agents, on SQLite and
# on PostgreSQL with 1 and 2 replicas, all in one run on this machine. After each run it checks
# that nothing was overspent: every agent's spent equals its allowed count × the amount, and the
# hot agent's tight-cap twin never went past its cap.
#
#   bash scripts/bench-store.sh                     # DURATION=10 AGENTS_MANY=1000 CONNS=32
#   BENCH_PG_ADMIN=postgres://postgres:postgres@127.0.0.1:5432/postgres bash scripts/bench-store.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
AGENTS_MANY=${AGENTS_MANY:-1000}
CONNS=${CONNS:-32}
PG_ADMIN=${BENCH_PG_ADMIN:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
echo "== building release binary"
cargo build --release --locked -q -p bulkhead
BIN=./target/release/bulkhead
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export BENCH_ADMIN="bench-admin-$RANDOM$RANDOM-0123456789abcdefghijklmnop"

start() { # port data [db_url]
  local args=(serve --listen "127.0.0.1:$1" --data "$2")
  [ -n "${3:-}" ] && args+=(--database-url "$3")
  BULKHEAD_ADMIN_TOKEN=$BENCH_ADMIN RUST_LOG=warn "$BIN" "${args[@]}" >"$2.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null && return; sleep 0.1; done
  echo "server on $1 did not start"; cat "$2.log"; exit 1
}

create() { # base handle cap -> key
  curl -sf -X POST "$1/v1/agents" -H "Authorization: Bearer $BENCH_ADMIN" \
    -d "{\"handle\":\"$2\",\"scopes\":[\"bench:*\"],\"spending_cap\":\"$3\",\"breaker\":{\"denials\":0}}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

# wrk against each base URL at once (connections split between them); prints "rps p99_ms".
load() { # script base...
  local script=$1; shift
  local n=$#; local c=$((CONNS / n)); local i=0
  for base in "$@"; do
    wrk -t1 -c"$c" -d"${DURATION}s" --latency -s "$script" "$base/v1/spend" >"$WORK/wrk-$i.txt" &
    i=$((i + 1))
  done
  wait
  python3 - "$WORK" "$n" <<'PY'
import re, sys, glob
rps, p99 = 0.0, 0.0
for i in range(int(sys.argv[2])):
    out = open(f"{sys.argv[1]}/wrk-{i}.txt").read()
    rps += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    v = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    p99 = max(p99, v)
    if "Non-2xx" in out:
        print("!! non-2xx answers:", re.search(r"Non-2xx.*", out).group(0), file=sys.stderr)
print(f"{rps:.0f} {p99:.2f}")
PY
}

# Checks that the agents' ledgers are exact: spent == tx_count × 1 micro, and ≤ cap.
check() { # base handles...
  local base=$1; shift
  for h in "$@"; do
    curl -sf "$base/v1/agents/$h" -H "Authorization: Bearer $BENCH_ADMIN"
    echo
  done | python3 -c '
import json, sys
bad = 0
for line in sys.stdin:
    a = json.loads(line); u = a["usage"]
    spent = round(float(u["window_spent"]) * 1e6)
    cap = round(float(a["spending_cap"]) * 1e6)
    if spent != u["tx_count"] or spent > cap:
        bad += 1; print("MISMATCH", a["handle"], spent, u["tx_count"], cap)
print("ok" if bad == 0 else "OVERSPEND OR LEDGER MISMATCH")'
}

results=()
run_case() { # label db_url replicas
  local label=$1 db=${2:-} replicas=$3
  local bases=()
  for r in $(seq 1 "$replicas"); do
    local port=$((18950 + r)); local dir="$WORK/$label-$r"
    start "$port" "$dir" "$db"
    bases+=("http://127.0.0.1:$port")
  done
  export BENCH_KEY; BENCH_KEY=$(create "${bases[0]}" hot 1000000)
  read -r hot_rps hot_p99 <<<"$(load scripts/bench/spend.lua "${bases[@]}")"
  local hot_ok; hot_ok=$(check "${bases[0]}" hot)
  python3 - "${bases[0]}" "$AGENTS_MANY" >"$WORK/keys" <<'PY'
import json, os, sys, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
for i in range(1, n + 1):
    body = json.dumps({"handle": f"many-{i}", "scopes": ["bench:*"], "spending_cap": "1000000", "breaker": {"denials": 0}})
    req = urllib.request.Request(base + "/v1/agents", data=body.encode(), method="POST",
                                 headers={"Authorization": "Bearer " + os.environ["BENCH_ADMIN"]})
    print(json.load(urllib.request.urlopen(req))["key"])
PY
  export BENCH_KEYS_FILE=$WORK/keys
  read -r many_rps many_p99 <<<"$(load scripts/bench/spend-many.lua "${bases[@]}")"
  local many_ok; many_ok=$(check "${bases[0]}" $(seq -f "many-%g" 1 "$AGENTS_MANY") | tail -n 1)
  results+=("$(printf '%-26s %10s %9s %6s %10s %9s %6s' "$label" "$hot_rps" "$hot_p99" "$hot_ok" "$many_rps" "$many_p99" "$many_ok")")
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

fresh_db() {
  local name="bh_bench_$RANDOM$RANDOM"
  psql "$PG_ADMIN" -qc "CREATE DATABASE $name" >/dev/null
  echo "${PG_ADMIN%/*}/$name"
}

run_case "SQLite, 1 process" "" 1
run_case "PostgreSQL, 1 replica" "$(fresh_db)" 1
run_case "PostgreSQL, 2 replicas" "$(fresh_db)" 2
echo
echo "wrk, $CONNS connections in all, ${DURATION}s per run, $AGENTS_MANY agents in the many-agents run, 2 cores"
printf '%-26s %10s %9s %6s %10s %9s %6s\n' "store" "hot req/s" "hot p99" "exact" "many req/s" "many p99" "exact"
for r in "${results[@]}"; do echo "$r"; done
