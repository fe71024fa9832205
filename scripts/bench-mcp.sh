#!/usr/bin/env bash
# Benchmark of the MCP gateway, one run on loopback: a `tools/call` of a trivial tool (`echo`)
# made directly to an MCP server, and the same call through Bulkhead's `/mcp/{server}` with an
# agent key, both with wrk -t2 -c$CONNS (32 concurrent clients). The server is the official MCP
# SDK's `MCPServer` (mcp==2.3.0, stateless, JSON answers) under uvicorn, the same one the tests
# use. Through Bulkhead every call is decided by the ledger and forwarded with the server's
# secret: by default with a slot of the key's lease for the tool (a durable, audited grant of
# many calls' price), settled after the answer with one audit event per call (its scope names the
# server and the tool, contract §11); and again on a server entry with `leases = false` (a
# durable, audited hold per call before it is forwarded, settled after the answer). The run
# ends by checking each agent's charges, and that every call of the default mode is audited.
#
#   bash scripts/bench-mcp.sh
#   DURATION=20 CONNS=32 bash scripts/bench-mcp.sh
#
# Prints calls/s and p50 for both, the p50 Bulkhead adds and the throughput ratio (goals: added
# p50 <= 0.3 ms, throughput >= 0.8x direct): with every process free to use every core, at 32
# clients and at 1, then (on 2 cores or more) with the MCP server pinned to a core of its own
# and a Bulkhead started on another (one HTTP worker), which wrk shares. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
PORT=${PORT:-18960}      # Bulkhead
UP_PORT=$((PORT + 1))    # the MCP server
PIN_PORT=$((PORT + 2))   # a second Bulkhead, started on one core (the pinned run)
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
# shellcheck source=scripts/python-venv.sh
source scripts/python-venv.sh
REQS=sdk/python/tests/frameworks/mcp/requirements.txt
VENV="$CACHE/fw-mcp-$(key_of "$REQS")"
ensure_venv "$VENV" "$REQS"
echo "== building release binary"
cargo build --release --locked -q -p bulkhead
BIN=${CARGO_TARGET_DIR:-target}/release/bulkhead

DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$VENV/bin/python" sdk/python/tests/frameworks/mcp/upstream.py --port "$UP_PORT" --json --stateless &
UP_PID=$!
PIDS+=($!)
cat >"$DIR/bulkhead.toml" <<EOF
[[mcp_server]]
name = "bench"
url = "http://127.0.0.1:$UP_PORT/mcp"
secret_env = "BENCH_MCP_TOKEN"
tools = { echo = "0.000001" }

[[mcp_server]]
name = "held"
url = "http://127.0.0.1:$UP_PORT/mcp"
secret_env = "BENCH_MCP_TOKEN"
tools = { echo = "0.000001" }
leases = false
EOF
ADMIN=bench-admin-token-0123456789abcdefghijklmnop
BENCH_MCP_TOKEN=bench-upstream-secret BULKHEAD_ADMIN_TOKEN=$ADMIN RUST_LOG=warn \
  "$BIN" serve --data "$DIR/data" --config "$DIR/bulkhead.toml" --listen "127.0.0.1:$PORT" >"$DIR/serve.log" 2>&1 &
BH_PID=$!
PIDS+=($!)
wait_port "$UP_PORT"
wait_port "$PORT"
B=http://127.0.0.1:$PORT
KEY=$(curl -sf -X POST "$B/v1/agents" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"handle":"bench-mcp","scopes":["mcp.bench:echo"],"spending_cap":"1000000.00"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
KEY_H=$(curl -sf -X POST "$B/v1/agents" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"handle":"bench-mcp-held","scopes":["mcp.held:echo"],"spending_cap":"1000000.00"}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')

cat >"$DIR/call.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},' ..
  '"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["MCP-Protocol-Version"] = "2026-07-28"
wrk.headers["Mcp-Method"] = "tools/call"
wrk.headers["Mcp-Name"] = "echo"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
EOF

PIN=""
cpu() { # pid -> its user+system CPU so far, in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}
run_wrk() { # label url key [conns] -> prints "rps p50_ms p99_ms requests"; CPU per call to $DIR/cpu-label
  local out u0 b0 c=${4:-$CONNS}
  u0=$(cpu "$UP_PID"); b0=$(cpu "$BH_PID")
  # shellcheck disable=SC2086 # $PIN is a command prefix (empty, or taskset and its CPU)
  out=$(BENCH_KEY=$3 $PIN wrk -t"$((c < 2 ? 1 : 2))" -c"$c" -d"${DURATION}s" --latency -s "$DIR/call.lua" "$2")
  echo "$(($(cpu "$UP_PID") - u0)) $(($(cpu "$BH_PID") - b0))" >"$DIR/cpu-$1"
  echo "$out" >"$DIR/wrk-$1.txt"
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "!! $1:" >&2; grep "Non-2xx\|Socket errors" <<<"$out" >&2; fi
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def ms(label):
    m = re.search(r"^\s*" + label + r"\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    v, u = float(m.group(1)), m.group(2)
    return v / 1000 if u == "us" else v * 1000 if u == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
n = int(re.search(r"(\d+) requests in", out).group(1))
print(f"{rps:.0f} {ms('50%'):.3f} {ms('99%'):.3f} {n}")
PY
}

# One answer each way first: the call works, and both answers agree.
direct=$(BENCH_KEY='' curl -sf "http://127.0.0.1:$UP_PORT/mcp" -H 'Content-Type: application/json' \
  -H 'Accept: application/json, text/event-stream' -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' \
  -H 'Mcp-Name: echo' -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}')
via=$(curl -sf "$B/mcp/bench" -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
  -H 'Accept: application/json, text/event-stream' -H 'MCP-Protocol-Version: 2026-07-28' -H 'Mcp-Method: tools/call' \
  -H 'Mcp-Name: echo' -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}')
[ "$direct" = "$via" ] || { echo "answers differ: $direct vs $via" >&2; exit 1; }

echo "== tools/call of a trivial tool, wrk -t2 -c$CONNS -d${DURATION}s on loopback, $(nproc) cores shared by wrk, the MCP server and bulkhead"
read -r d_rps d_p50 d_p99 d_n <<<"$(run_wrk direct "http://127.0.0.1:$UP_PORT/mcp" '')"
read -r g_rps g_p50 g_p99 g_n <<<"$(run_wrk bulkhead "$B/mcp/bench" "$KEY")"
read -r l_rps l_p50 l_p99 l_n <<<"$(run_wrk held "$B/mcp/held" "$KEY_H")"
printf '%-10s %10s %10s %10s\n' target calls/s p50_ms p99_ms
printf '%-10s %10s %10s %10s\n' direct "$d_rps" "$d_p50" "$d_p99"
printf '%-10s %10s %10s %10s   (the default: leases, each call audited)\n' bulkhead "$g_rps" "$g_p50" "$g_p99"
printf '%-10s %10s %10s %10s   (leases = false: a hold per call)\n' held "$l_rps" "$l_p50" "$l_p99"
python3 - "$d_rps" "$d_p50" "$g_rps" "$g_p50" "$d_n" "$g_n" "$(cat "$DIR/cpu-direct")" "$(cat "$DIR/cpu-bulkhead")" "$(getconf CLK_TCK)" "$CONNS" <<'PY'
import sys
d_rps, d_p50, g_rps, g_p50, d_n, g_n = map(float, sys.argv[1:7])
(du, _), (gu, gb) = (map(int, a.split()) for a in sys.argv[7:9])
tick_us = 1e6 / int(sys.argv[9])
print(f"at {sys.argv[10]} clients: added p50 {g_p50 - d_p50:.3f} ms (goal <= 0.3 ms); "
      f"throughput {g_rps / d_rps:.2f}x direct (goal >= 0.8x)")
print(f"CPU per call: MCP server {du * tick_us / d_n:.0f} us direct, {gu * tick_us / g_n:.0f} us via Bulkhead; "
      f"Bulkhead {gb * tick_us / g_n:.0f} us")
PY
python3 - "$d_rps" "$d_p50" "$l_rps" "$l_p50" "$l_n" "$(cat "$DIR/cpu-held")" "$(getconf CLK_TCK)" "$CONNS" <<'PY'
import sys
d_rps, d_p50, l_rps, l_p50, l_n = map(float, sys.argv[1:6])
lu, lb = map(int, sys.argv[6].split())
tick_us = 1e6 / int(sys.argv[7])
print(f"leases = false, at {sys.argv[8]} clients: added p50 {l_p50 - d_p50:.3f} ms; throughput {l_rps / d_rps:.2f}x direct; "
      f"CPU per call: Bulkhead {lb * tick_us / l_n:.0f} us")
PY
# One client at a time: the latency Bulkhead adds to a call when nothing queues.
read -r d1_rps d1_p50 d1_p99 _ <<<"$(run_wrk direct1 "http://127.0.0.1:$UP_PORT/mcp" '' 1)"
read -r g1_rps g1_p50 g1_p99 _ <<<"$(run_wrk bulkhead1 "$B/mcp/bench" "$KEY" 1)"
read -r l1_rps l1_p50 l1_p99 _ <<<"$(run_wrk held1 "$B/mcp/held" "$KEY_H" 1)"
printf '%-10s %10s %10s %10s   (1 client)\n' direct "$d1_rps" "$d1_p50" "$d1_p99"
printf '%-10s %10s %10s %10s   (1 client)\n' bulkhead "$g1_rps" "$g1_p50" "$g1_p99"
printf '%-10s %10s %10s %10s   (1 client, leases = false)\n' held "$l1_rps" "$l1_p50" "$l1_p99"
python3 -c "import sys; d, g, l = map(float, sys.argv[1:]); print(f'1 client: added p50 {g - d:.3f} ms, leases = false {l - d:.3f} ms')" \
  "$d1_p50" "$g1_p50" "$l1_p50"
# The MCP server on a core of its own, as a server on its own host would be, and a Bulkhead
# started on the other core (so with one HTTP worker), which wrk shares. At 32 clients the p50
# is then the server's queue plus what Bulkhead adds to each call, not Bulkhead's CPU taken
# from the server's core.
B1=""
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  taskset -a -p -c 0 "$UP_PID" >/dev/null
  BENCH_MCP_TOKEN=bench-upstream-secret BULKHEAD_ADMIN_TOKEN=$ADMIN RUST_LOG=warn taskset -c 1 \
    "$BIN" serve --data "$DIR/data-pinned" --config "$DIR/bulkhead.toml" --listen "127.0.0.1:$PIN_PORT" >"$DIR/serve-pinned.log" 2>&1 &
  PIDS+=($!)
  wait_port "$PIN_PORT"
  B1=http://127.0.0.1:$PIN_PORT
  KEY_P=$(curl -sf -X POST "$B1/v1/agents" -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d '{"handle":"bench-mcp","scopes":["mcp.bench:echo"],"spending_cap":"1000000.00"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  PIN="taskset -c 1"
  read -r dp_rps dp_p50 dp_p99 _ <<<"$(run_wrk direct-pinned "http://127.0.0.1:$UP_PORT/mcp" '')"
  read -r gp_rps gp_p50 gp_p99 _ <<<"$(run_wrk bulkhead-pinned "$B1/mcp/bench" "$KEY_P")"
  PIN=""
  taskset -a -p -c "0-$(($(nproc) - 1))" "$UP_PID" >/dev/null
  printf '%-10s %10s %10s %10s   (MCP server on CPU 0; wrk on CPU 1)\n' direct "$dp_rps" "$dp_p50" "$dp_p99"
  printf '%-10s %10s %10s %10s   (MCP server on CPU 0; wrk and Bulkhead on CPU 1)\n' bulkhead "$gp_rps" "$gp_p50" "$gp_p99"
  python3 -c "import sys; dr, dp, gr, gp = map(float, sys.argv[1:5]); \
print(f'server on its own core, at {sys.argv[5]} clients: added p50 {gp - dp:.3f} ms (goal <= 0.3 ms); throughput {gr / dr:.2f}x direct (goal >= 0.8x)')" \
    "$dp_rps" "$dp_p50" "$gp_rps" "$gp_p50" "$CONNS"
fi
# Charges: every call the gateway forwarded was charged 0.000001; a call whose client hung up
# before it was sent (wrk stopping) is charged (leased: its slot is billed when dropped) or
# released (a hold per call). Settlements still under way are waited for first.
check() { # handle [base URL]
  local B=${2:-$B}
  for _ in $(seq 1 100); do
    held=$(curl -sf "$B/v1/agents/$1" -H "Authorization: Bearer $ADMIN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"]["window_held"])')
    [ "$held" = "0.00" ] && break
    sleep 0.1
  done
  curl -sf "$B/v1/agents/$1" -H "Authorization: Bearer $ADMIN" | python3 -c '
import json, sys
from decimal import Decimal
u = json.load(sys.stdin)["usage"]
calls, spent, held, denied = u["tx_count"], Decimal(u["lifetime_spent"]), Decimal(u["window_held"]), u["denied_count"]
price = Decimal("0.000001")
assert spent % price == 0 and held == 0 and denied == 0, (spent, held, denied)
charged = int(spent / price)
assert 0 <= calls - charged <= 2 * int(sys.argv[2]) + 2, (calls, charged)
print(f"{sys.argv[1]}: {calls} calls decided, spent {spent} = {charged} x price ({calls - charged} released unsent)")
' "$1" "$CONNS"
}
check bench-mcp
check bench-mcp-held
[ -z "$B1" ] || check bench-mcp "$B1"
# Contract §11: in the default mode every call is an audit event naming the server and the tool.
curl -sf "$B/v1/agents/bench-mcp" -H "Authorization: Bearer $ADMIN" | python3 -c '
import json, sqlite3, sys
calls = json.load(sys.stdin)["usage"]["tx_count"]
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
n, = db.execute("SELECT COUNT(*) FROM audit_events WHERE agent = ? AND action = ? AND scope = ?",
                ("bench-mcp", "capture", "mcp.bench:echo")).fetchone()
assert n == calls, (n, calls)
print(f"bench-mcp: {n} capture events with scope mcp.bench:echo for {calls} calls")
' "$DIR/data/bulkhead.db"
