-- wrk script: POST /v1/spend round-robin over the keys in BENCH_KEYS_FILE (one per line).
local keys = {}
for line in io.lines(os.getenv("BENCH_KEYS_FILE")) do
  table.insert(keys, line)
end
local i = 0
function setup(thread)
  thread:set("offset", math.random(#keys))
end
function init(args)
  i = offset
end
request = function()
  i = (i % #keys) + 1
  return wrk.format("POST", "/v1/spend",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. keys[i]},
    '{"scope":"bench:run","amount":"0.000001"}')
end
