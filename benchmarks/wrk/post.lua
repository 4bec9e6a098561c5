-- wrk script for bench_throughput.py: POST /generate bodies, a JSON summary at the end.
--
--   wrk -t1 -c64 -d10s -s post.lua http://127.0.0.1:30000 -- stream 1024
--
-- args[1]: "stream" for "stream": true bodies, anything else for whole answers.
-- args[2]: how many distinct prompts to cycle through (default 1024). They share a long
-- prefix, so a cache-aware router has real matching work to do, and the set is bounded, so
-- its tree stops growing. The requests are formatted once in init(): request() only picks
-- one, which keeps wrk far from being the bottleneck.
-- done() prints one line "WRK_JSON {...}" that the benchmark parses (latency in microseconds).

local requests = {}
local count = 0
local counter = 0

function init(args)
  local stream = args[1] == "stream"
  count = tonumber(args[2] or "1024")
  local prefix = string.rep("You are a helpful assistant. Answer briefly. ", 6)
  local headers = { ["Content-Type"] = "application/json" }
  for i = 1, count do
    local body = string.format(
      '{"text":"%sUser %d asks question %d.","sampling_params":{"max_new_tokens":8},"stream":%s}',
      prefix, i % 97, i, stream and "true" or "false")
    requests[i] = wrk.format("POST", "/generate", headers, body)
  end
end

function request()
  counter = counter % count + 1
  return requests[counter]
end

function done(summary, latency, requests_)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
