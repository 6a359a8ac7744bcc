-- wrk script for bench/channels.sh: BonyChat's POST /message over many channels, like
-- bench/message.lua (texts spread over CONTACTS contacts, default 100 000) but on the routes of a
-- channels file.
--
--   CHANNELS unset or 0   POST /message with BONYCHAT_API_TOKEN (the single channel `default`
--                         of the environment variables; what bench/message.lua sends)
--   CHANNEL=<name>        POST /channels/<name>/message, every request on that one channel
--   CHANNELS=N            POST /channels/<name>/message, a contact's messages on channel
--                         (contact number mod N): every channel gets its share at once, and
--                         which requests find their contact busy is the same as with one channel
--                         (bench/message.lua's two threads walk the same contacts 3 apart)
--
-- bench/channels.sh writes the channels file with the same rule as channel_of() below: channel
-- i (0-based) is named c<i+1, four digits>, has the token bench-token-<name> and the Channel ID
-- bench-channel-<name>. All requests and tokens are made before the load starts (init), so the
-- script costs the same per request whichever the channel.
-- CONTACT_ORDER: `sequential` (the default, as bench/message.lua): a thread's k-th request goes to
-- contact k (plus its offset), so with one channel every store index keyed by contact grows at
-- its right edge, a few pages a commit; `scattered`: contact (k × 7919) mod CONTACTS instead,
-- the same contacts in the same pattern of overlaps but far apart in key order, as real
-- contacts arrive: each insert lands on a page of its own, with one channel as with many.
-- DELAY_MS (default 0) pauses each connection that long before its next request: a modest,
-- steady rate for the latency of a channel rather than its throughput.
-- done() adds `accepted N` (answers 200) to the HARNESS line.
local offset = tonumber(os.getenv("CONTACT_OFFSET") or "0")
local contacts = tonumber(os.getenv("CONTACTS") or "100000")
local channels = tonumber(os.getenv("CHANNELS") or "0")
local one = os.getenv("CHANNEL")
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local scattered = os.getenv("CONTACT_ORDER") == "scattered"

dofile("bench/report.lua")

local function channel_of(i) return string.format("c%04d", i + 1) end

-- path, headers and the body's prefix of each channel this thread uses
local routes = {}
local function route(token, channel_id, path)
  return {
    path = path,
    headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" },
    prefix = '{"channelId":"' .. channel_id .. '","contactId":"',
  }
end

function init(args)
  n = 0
  accepted = 0
  if one then
    routes[1] = route("bench-token-" .. one, "bench-channel-" .. one, "/channels/" .. one .. "/message")
  elseif channels > 0 then
    for i = 0, channels - 1 do
      local name = channel_of(i)
      routes[i + 1] = route("bench-token-" .. name, "bench-channel-" .. name, "/channels/" .. name .. "/message")
    end
  else
    routes[1] = route(os.getenv("BONYCHAT_API_TOKEN") or "bench-token",
      os.getenv("BONYCHAT_CHANNEL_ID") or "bench-channel", "/message")
  end
end

request = function()
  n = n + 1
  local c = (id * 1000003 + n) % contacts
  if scattered then c = (c * 7919) % contacts end
  c = offset + c
  local r = routes[c % #routes + 1]
  local contact = string.format("%d", 1000000000000000 + c)
  local body = r.prefix .. contact .. '","message":{"type":"text","text":"Benchmark message number ' .. n ..
    ' from thread ' .. id .. '"}}'
  return wrk.format("POST", r.path, r.headers, body)
end

if delay_ms > 0 then
  delay = function() return delay_ms end
end

response = function(status, headers, body)
  if status == 200 then accepted = accepted + 1 end
  count_unexpected(status, body)
end

done = function(summary, latency, requests)
  harness_line(summary, latency, string.format(" accepted %d", sum_over_threads("accepted")))
end
