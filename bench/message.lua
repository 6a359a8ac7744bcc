-- wrk script: BonyChat's POST /message, spread over CONTACTS (100 000) contacts so that contacts are
-- served in parallel as in a real workspace (one contact's messages go one at a time).
-- Several wrk processes at once (one per replica) each take their own contacts.
local offset = tonumber(os.getenv("CONTACT_OFFSET") or "0")
local contacts = tonumber(os.getenv("CONTACTS") or "100000")

dofile("bench/report.lua")

function init(args)
  n = 0
end

request = function()
  n = n + 1
  local contact = string.format("%d", 1000000000000000 + offset + (id * 1000003 + n) % contacts)
  return message_request(contact, "Benchmark message number " .. n .. " from thread " .. id)
end

-- Any answer other than 200 is an error for the benchmark.
response = function(status, headers, body)
  count_unexpected(status, body)
end

done = function(summary, latency, requests)
  harness_line(summary, latency)
end
