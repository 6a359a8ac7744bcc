-- wrk script: signed Messenger webhook batches from the file WEBHOOK_FILE (made by
-- `bench_prepare webhooks`), one `<X-Hub-Signature-256> <body>` a line. Thread t of T (the
-- argument after `--` is T) sends the lines i with i % T == t, in order, reading them as it
-- goes; if a run outlasts the file it starts over, and the repeats are duplicates to the relay
-- (counted in `wraps`).

dofile("bench/report.lua")

function init(args)
  total = tonumber(args[1] or "1")
  file = assert(io.open(os.getenv("WEBHOOK_FILE")))
  wraps = 0
  skip(id)
end

-- Skips n lines, starting over at the end of the file.
function skip(n)
  for _ = 1, n do
    if not file:read("*l") then
      file:seek("set", 0)
      wraps = wraps + 1
      file:read("*l")
    end
  end
end

request = function()
  local line = file:read("*l")
  if not line then
    file:seek("set", 0)
    wraps = wraps + 1
    skip(id)
    line = file:read("*l")
  end
  skip(total - 1)
  local space = line:find(" ", 1, true)
  return wrk.format("POST", "/webhooks/messenger", {
    ["Content-Type"] = "application/json",
    ["X-Hub-Signature-256"] = line:sub(1, space - 1),
  }, line:sub(space + 1))
end

response = function(status, headers, body)
  count_unexpected(status, body)
end

done = function(summary, latency, requests)
  harness_line(summary, latency, string.format(" wraps %d", sum_over_threads("wraps")))
end
