-- wrk script: POST /v1/agents with a fresh handle per request (admin token in BENCH_ADMIN).
local counter = 0
local thread_id = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  thread_id = tid
end
request = function()
  counter = counter + 1
  local body = string.format(
    '{"handle":"fleet-%d-%d-%d","scopes":["bench:run"],"spending_cap":"10.00"}',
    thread_id, os.time(), counter)
  return wrk.format("POST", "/v1/agents",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("BENCH_ADMIN")}, body)
end
