#!/usr/bin/env bash
# Benchmark of the agent gateway, in one run on loopback with wrk -t2 -c32:
#   1. a static upstream called directly (nginx answering a small JSON body),
#   2. nginx as a plain reverse proxy to it (keep-alive upstream connections, header set),
#   3. Bulkhead's gateway to it with full enforcement: every call forwarded only with a slot of
#      a durable, audited lease (key, scope, rate and caps checked by the ledger), the secret
#      injected, each call's price captured by a durable, audited settlement (one event per
#      call) a few milliseconds after its answer. The run ends by checking that the agent's
#      spend equals the calls made, to the micro-unit.
#
#   bash scripts/bench-gateway.sh                          # SQLite (embedded store)
#   BENCH_DATABASE_URL=postgres://… bash scripts/bench-gateway.sh   # PostgreSQL (a fresh database!)
#   DURATION=20 CONNS=32 bash scripts/bench-gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
PORT=${PORT:-18950}       # Bulkhead
UP_PORT=$((PORT + 1))     # the static upstream (nginx)
PROXY_PORT=$((PORT + 2))  # nginx as a reverse proxy
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

# --- nginx: the static upstream and the plain reverse proxy (one master, two servers) ---
mkdir -p "$DIR/nginx"
cat >"$DIR/nginx/nginx.conf" <<EOF
daemon off;
worker_processes auto;
error_log $DIR/nginx/error.log warn;
pid $DIR/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $DIR/nginx/body;
  proxy_temp_path $DIR/nginx/proxy;
  fastcgi_temp_path $DIR/nginx/fastcgi;
  uwsgi_temp_path $DIR/nginx/uwsgi;
  scgi_temp_path $DIR/nginx/scgi;
  keepalive_requests 1000000;
  upstream static_upstream { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$UP_PORT;
    location / {
      default_type application/json;
      return 200 '{"id":"bench","object":"result","data":[1,2,3],"ok":true}';
    }
  }
  server {
    listen 127.0.0.1:$PROXY_PORT;
    location / {
      proxy_pass http://static_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer bench-upstream-secret";
    }
  }
}
EOF
nginx -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" &
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
export BENCH_ADMIN="bench-admin-$RANDOM$RANDOM"
B="http://127.0.0.1:$PORT"
args=(serve --listen "127.0.0.1:$PORT" --data "$DIR/data" --config "$DIR/bulkhead.toml")
[ -n "${BENCH_DATABASE_URL:-}" ] && args+=(--database-url "$BENCH_DATABASE_URL")
BENCH_UPSTREAM_SECRET=bench-upstream-secret BULKHEAD_ADMIN_TOKEN=$BENCH_ADMIN RUST_LOG=warn \
  ./target/release/bulkhead "${args[@]}" >"$DIR/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf "$B/healthz" >/dev/null && curl -sf "http://127.0.0.1:$UP_PORT/" >/dev/null &&
    curl -sf "http://127.0.0.1:$PROXY_PORT/" >/dev/null && break
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

echo "== $store store, wrk -t2 -c$CONNS -d${DURATION}s on loopback, $(nproc) cores shared by wrk, nginx and bulkhead"
read -r d_rps d_p50 d_p99 _ <<<"$(run_wrk direct "http://127.0.0.1:$UP_PORT/v1/ping")"
read -r n_rps n_p50 n_p99 _ <<<"$(run_wrk nginx "http://127.0.0.1:$PROXY_PORT/v1/ping")"
read -r g_rps g_p50 g_p99 g_n <<<"$(run_wrk gateway "$B/proxy/static/v1/ping" "$DIR/gateway.lua")"
printf '%-48s %10s %9s %9s\n' "target" "req/s" "p50 ms" "p99 ms"
printf '%-48s %10s %9s %9s\n' "static upstream, direct (nginx)" "$d_rps" "$d_p50" "$d_p99"
printf '%-48s %10s %9s %9s\n' "nginx reverse proxy -> upstream" "$n_rps" "$n_p50" "$n_p99"
printf '%-48s %10s %9s %9s\n' "bulkhead gateway -> upstream (leased, settled)" "$g_rps" "$g_p50" "$g_p99"
python3 - <<PY
g, n, d = $g_rps, $n_rps, $d_rps
print(f"gateway/nginx-proxy throughput: {g/n:.2f}x   gateway/direct: {g/d:.2f}x")
print(f"added at p50: gateway {($g_p50 - $d_p50):.3f} ms, nginx proxy {($n_p50 - $d_p50):.3f} ms over direct; gateway over nginx proxy {($g_p50 - $n_p50):.3f} ms")
PY
sleep 1 # idle leases give their unused slots back
spent=$(curl -sf "$B/v1/agents/bench-agent" -H "Authorization: Bearer $BENCH_ADMIN" |
  python3 -c 'import json,sys; u=json.load(sys.stdin)["usage"]; print(u["window_spent"], u["window_held"], u["tx_count"])')
echo "bench agent after the run: window_spent window_held tx_count = $spent (wrk completed $g_n gateway calls + 1 smoke call)"
