-- wrk script: BonyChat's POST /message, spread over 100 000 contacts so that contacts are
-- served in parallel as in a real workspace (one contact's messages go one at a time).
local token = os.getenv("BONYCHAT_API_TOKEN") or "bench-token"
local channel = os.getenv("BONYCHAT_CHANNEL_ID") or "bench-channel"
local counter = 0
-- Several wrk processes at once (one per replica) each take their own contacts.
local offset = tonumber(os.getenv("CONTACT_OFFSET") or "0")

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  n = 0
end

request = function()
  n = n + 1
  local contact = string.format("%d", 1000000000000000 + offset + (id * 1000003 + n) % 100000)
  local body = '{"channelId":"' .. channel .. '","contactId":"' .. contact ..
    '","message":{"type":"text","text":"Benchmark message number ' .. n .. ' from thread ' .. id .. '"}}'
  return wrk.format("POST", "/message", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end

-- Any answer other than 200 is an error for the benchmark.
response = function(status, headers, body)
  if status ~= 200 then
    errors = (errors or 0) + 1
    if errors <= 3 then print("unexpected " .. status .. ": " .. body) end
  end
end

-- One parseable line for bench/harness.sh; wrk's own --latency table stops at 99 %.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("HARNESS requests %d duration_us %d p50_us %d p99_us %d p999_us %d non2xx %d socket_errors %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.status, e.connect + e.read + e.write + e.timeout))
end
