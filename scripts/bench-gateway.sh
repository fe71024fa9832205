#!/usr/bin/env bash
# Benchmark of the agent gateway, in one run on loopback with wrk -t2 -c32:
#   1. a static upstream called directly (nginx answering a small JSON body),
#   2. nginx as a plain reverse proxy to it (keep-alive upstream connections, header set), in
#      processes of its own, as Bulkhead is: the comparison the goal is judged by;
#   3. the same nginx proxy served by the upstream's own worker processes (a setup that saves
#      nginx the switch between proxy and upstream; shown for reference);
#   4. Bulkhead's gateway to it with full enforcement: every call forwarded only with a slot of
#      a durable, audited lease (key, scope, rate and caps checked by the ledger), the secret
#      injected, each call's price captured by a durable, audited settlement (one capture event
#      per settlement, each call's cost in it) a few milliseconds after its answer. The run ends
#      by checking that the agent's spend equals the calls made, to the micro-unit.
# The targets take turns, ROUNDS times; the table shows each one's median round.
#
#   bash scripts/bench-gateway.sh                          # SQLite (embedded store)
#   BENCH_DATABASE_URL=postgres://… bash scripts/bench-gateway.sh   # PostgreSQL (a fresh database!)
#   DURATION=20 CONNS=32 ROUNDS=5 bash scripts/bench-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18950}       # Bulkhead
UP_PORT=$((PORT + 1))     # the static upstream (nginx)
PROXY_PORT=$((PORT + 2))  # nginx as a reverse proxy, in its own processes
SHARED_PORT=$((PORT + 3)) # nginx as a reverse proxy, in the upstream's processes
need() { command -v "$1" >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need curl curl
need nginx nginx
echo "== building release binary"
cargo build --release --locked -q -p bulkhead

DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

# --- nginx: the static upstream (with a proxy server in the same processes), and the reverse
# proxy in processes of its own ---
proxy_server() { # port
  cat <<EOC
  upstream static_upstream { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://static_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench-upstream-secret";
    }
  }
EOC
}
nginx_conf() { # dir servers
  cat <<EOC
daemon off;
worker_processes auto;
error_log $1/error.log warn;
pid $1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
$2
}
EOC
}
mkdir -p "$DIR/nginx" "$DIR/nginx-proxy"
nginx_conf "$DIR/nginx" "  server {
    listen 127.0.0.1:$UP_PORT;
    location / {
      default_type application/json;
      return 200 '{\"id\":\"bench\",\"object\":\"result\",\"data\":[1,2,3],\"ok\":true}';
    }
  }
$(proxy_server "$SHARED_PORT")" >"$DIR/nginx/nginx.conf"
nginx_conf "$DIR/nginx-proxy" "$(proxy_server "$PROXY_PORT")" >"$DIR/nginx-proxy/nginx.conf"
nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" &
PIDS+=($!)
nginx -p "$DIR/nginx-proxy" -c "$DIR/nginx-proxy/nginx.conf" &
PIDS+=($!)

# --- Bulkhead with one upstream: the same static server ---
cat >"$DIR/bulkhead.toml" <<EOF
[[upstream]]
name = "static"
base_url = "http://127.0.0.1:$UP_PORT"
scope = "bench:run"
secret_env = "BENCH_UPSTREAM_SECRET"
max_cost_per_request = "0.000001"
pricing = { kind = "per_request", price = "0.000001" }
EOF
export BENCH_ADMIN="bench-admin-$RANDOM$RANDOM-0123456789abcdefghijklmnop"
B="http://127.0.0.1:$PORT"
args=(serve --listen "127.0.0.1:$PORT" --data "$DIR/data" --config "$DIR/bulkhead.toml")
[ -n "${BENCH_DATABASE_URL:-}" ] && args+=(--database-url "$BENCH_DATABASE_URL")
BENCH_UPSTREAM_SECRET=bench-upstream-secret BULKHEAD_ADMIN_TOKEN=$BENCH_ADMIN RUST_LOG=warn \
  ./target/release/bulkhead "${args[@]}" >"$DIR/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf "$B/healthz" >/dev/null && curl -sf "http://127.0.0.1:$UP_PORT/" >/dev/null &&
    curl -sf "http://127.0.0.1:$PROXY_PORT/" >/dev/null && curl -sf "http://127.0.0.1:$SHARED_PORT/" >/dev/null && break
  sleep 0.1
done
store=${BENCH_DATABASE_URL:+PostgreSQL}; store=${store:-SQLite}

export BENCH_KEY
BENCH_KEY=$(curl -sf -X POST "$B/v1/agents" -H "Authorization: Bearer $BENCH_ADMIN" \
  -d '{"handle":"bench-agent","scopes":["bench:*"],"spending_cap":"1000000000","breaker":{"denials":0}}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
curl -sf "$B/proxy/static/v1/ping" -H "Authorization: Bearer $BENCH_KEY" >/dev/null || {
  echo "gateway smoke call failed" >&2; cat "$DIR/server.log" >&2; exit 1; }

cat >"$DIR/gateway.lua" <<'EOF'
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
EOF

run_wrk() { # label url [script] -> prints "rps p50_ms p99_ms requests"
  local out
  if [ -n "${3:-}" ]; then out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$3" "$2"); else out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$2"); fi
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

echo "== $store store, wrk -t2 -c$CONNS -d${DURATION}s on loopback, $ROUNDS rounds, $(nproc) cores shared by wrk, nginx and bulkhead"
: >"$DIR/rounds.txt"
g_total=0
for r in $(seq 1 "$ROUNDS"); do
  read -r d_rps d_p50 d_p99 _ <<<"$(run_wrk direct "http://127.0.0.1:$UP_PORT/v1/ping")"
  read -r n_rps n_p50 n_p99 _ <<<"$(run_wrk nginx "http://127.0.0.1:$PROXY_PORT/v1/ping")"
  read -r s_rps s_p50 s_p99 _ <<<"$(run_wrk shared "http://127.0.0.1:$SHARED_PORT/v1/ping")"
  read -r g_rps g_p50 g_p99 g_n <<<"$(run_wrk gateway "$B/proxy/static/v1/ping" "$DIR/gateway.lua")"
  g_total=$((g_total + g_n))
  echo "$r $d_rps $d_p50 $d_p99 $n_rps $n_p50 $n_p99 $s_rps $s_p50 $s_p99 $g_rps $g_p50 $g_p99" >>"$DIR/rounds.txt"
  echo "   round $r: direct $d_rps, nginx proxy $n_rps, shared $s_rps, gateway $g_rps req/s"
done
python3 - "$DIR/rounds.txt" <<'PY'
import statistics, sys
rows = [list(map(float, l.split()))[1:] for l in open(sys.argv[1]) if l.strip()]
def col(i): return [r[i] for r in rows]
med = lambda i: statistics.median(col(i))
names = ["static upstream, direct (nginx)", "nginx reverse proxy (own processes)",
         "nginx reverse proxy (upstream's processes)", "bulkhead gateway (leased, settled)"]
print(f"{'target (median of rounds)':<48} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
for k, name in enumerate(names):
    print(f"{name:<48} {med(3*k):>10.0f} {med(3*k+1):>9.3f} {med(3*k+2):>9.3f}")
ratios = [r[9] / r[3] for r in rows]
shared = [r[9] / r[6] for r in rows]
added = [r[10] - r[4] for r in rows]
print(f"gateway / nginx proxy throughput, per round: {', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
print(f"gateway / nginx proxy in the upstream's processes: median {statistics.median(shared):.2f}x")
print(f"gateway p50 over nginx proxy p50, per round: {', '.join(f'{x:+.3f}' for x in added)} ms (median {statistics.median(added):+.3f} ms)")
PY
# Idle leases give their unused slots back within a few hundred milliseconds; then the agent's
# spend must be its calls times the price, to the micro-unit. Calls that wrk cut off when it
# stopped were forwarded (or at least given a slot) and are charged too, so tx_count may exceed
# what wrk counted by up to the connections in flight at each stop.
for _ in $(seq 1 50); do
  usage=$(curl -sf "$B/v1/agents/bench-agent" -H "Authorization: Bearer $BENCH_ADMIN")
  python3 -c 'import json,sys,decimal; sys.exit(decimal.Decimal(json.loads(sys.argv[1])["usage"]["window_held"]) != 0)' "$usage" && break
  sleep 0.2
done
python3 - "$usage" "$g_total" "$ROUNDS" "$CONNS" <<'PY'
import json, sys
from decimal import Decimal
u = json.loads(sys.argv[1])["usage"]
completed, rounds, conns = int(sys.argv[2]) + 1, int(sys.argv[3]), int(sys.argv[4])
spent, held, tx = Decimal(u["window_spent"]), Decimal(u["window_held"]), u["tx_count"]
exact = spent == tx * Decimal("0.000001") and held == 0
print(f"bench agent after the run: spent {spent}, held {held}, tx_count {tx}; wrk completed {completed} "
      f"(with the smoke call), {tx - completed} cut off in flight; spend = calls x price exactly: {'yes' if exact else 'NO'}")
if not exact or not 0 <= tx - completed <= rounds * conns:
    sys.exit("the ledger does not match the calls")
PY
