-- wrk script: every request is a distinct SMSPilot callback (a unique server_id), so
-- JetStream's duplicate detection never short-cuts a publish. Counts non-"OK" answers.
-- Arguments after `--`: the path and a numeric base that makes ids unique across runs.
local threads = {}

setup = function(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

init = function(args)
  path = args[1]
  base = tonumber(args[2])
  counter = 0
  bad = 0
end

request = function()
  counter = counter + 1
  local id = base + tid * 100000000 + counter
  return wrk.format("GET", path .. "?server_id=" .. string.format("%d", id) .. "&status=2&error=0")
end

response = function(status, headers, body)
  if status ~= 200 or body ~= "OK" then
    bad = bad + 1
  end
end

done = function(summary, latency, requests)
  local not_ok = 0
  for _, t in ipairs(threads) do
    not_ok = not_ok + t:get("bad")
  end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"not_ok":%d,"socket_errors":%d,'
      .. '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration, not_ok,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000))
end
