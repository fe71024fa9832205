-- wrk script: POST /v1/spend with an agent key (BENCH_KEY) and a one-micro-unit amount.
wrk.method = "POST"
wrk.body = '{"scope":"bench:run","amount":"0.000001"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
