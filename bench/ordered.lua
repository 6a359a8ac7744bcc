-- wrk script: per-contact ordered messages for bench/harness.sh. Run with one connection per
-- thread (-tN -cN): each thread owns the contacts c with c % N == its id and waits for each
-- answer before its next request, so a contact never has two requests in flight and its
-- messages "c<c> n<k>" (k = 1, 2, …) are accepted in order. CONTACTS (default 1000) contacts.

dofile("bench/report.lua")

function init(args)
  local total = tonumber(args[1] or "1")
  local contacts = tonumber(os.getenv("CONTACTS") or "1000")
  owned, sent, next_one, accepted = {}, {}, 0, 0
  -- wrk calls thread 0's request() once in its main thread, to check the script, before the
  -- thread starts: that request is never sent, so it must not take a number.
  checking = id == 0
  for c = id, contacts - 1, total do
    table.insert(owned, c)
    sent[c] = 0
  end
end

request = function()
  local c, k
  if checking then
    checking = false
    c = owned[1]
    k = sent[c] + 1
  else
    next_one = next_one % #owned + 1
    c = owned[next_one]
    sent[c] = sent[c] + 1
    k = sent[c]
  end
  return message_request(string.format("%d", 1000000000000000 + c), "c" .. c .. " n" .. k)
end

-- A refused message would leave a hole the stand-in reports as out of order: say so.
response = function(status, headers, body)
  if status == 200 then accepted = accepted + 1 end
  count_unexpected(status, body)
end

done = function(summary, latency, requests)
  harness_line(summary, latency, string.format(" accepted %d", sum_over_threads("accepted")))
end
