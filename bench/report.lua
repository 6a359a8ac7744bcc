-- Shared by the wrk scripts, loaded with dofile (so wrk runs from the repository's root).

-- Numbers the threads 0, 1, … (each sees its own as `id`) and keeps them for `done()`.
threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

-- One parseable line for bench/harness.sh (wrk's own --latency table stops at 99 %), then
-- `extra` ("name value" pairs the script adds).
function harness_line(summary, latency, extra)
  local e = summary.errors
  io.write(string.format("HARNESS requests %d duration_us %d p50_us %d p99_us %d p999_us %d max_us %d non2xx %d socket_errors %d%s\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency.max, e.status, e.connect + e.read + e.write + e.timeout, extra or ""))
end

-- The sum of the per-thread counter `name` (each thread keeps its own in its Lua state).
function sum_over_threads(name)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get(name) end
  return total
end

-- BonyChat's POST /message of `text` to `contact`, with the channel's token (both from the
-- relay's variables when set).
local token = os.getenv("BONYCHAT_API_TOKEN") or "bench-token"
local channel = os.getenv("BONYCHAT_CHANNEL_ID") or "bench-channel"
function message_request(contact, text)
  local body = '{"channelId":"' .. channel .. '","contactId":"' .. contact ..
    '","message":{"type":"text","text":"' .. text .. '"}}'
  return wrk.format("POST", "/message", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
  }, body)
end

-- Counts and shows (the first three) answers other than 200.
function count_unexpected(status, body)
  if status ~= 200 then
    errors = (errors or 0) + 1
    if errors <= 3 then print("unexpected " .. status .. ": " .. body) end
  end
end
