#!/usr/bin/env bash
# The relay against its own ceilings, in one run, with the server under test on CPU 0 and
# everything else (wrk, the JoinChat and BonyChat stand-ins, this script) on CPU 1. Prints a
# Markdown report and writes it to bench/results/harness-<date>-<HHMM>.md (UTC).
#
#   bash bench/harness.sh               # 10 s per load run, about 5 minutes in all
#   DURATION=30 bash bench/harness.sh
#
# Knobs: CONNECTIONS ("1 64 512"), BACKLOG (100000 jobs), BACKLOG_CONTACTS (1000), the idle-pause
# section's COLD_CONTACTS (1000), COLD_IDLE (10 s) and COLD_ROUND (8 s),
# E2E_CONTACTS (1000), WEBHOOK_BATCHES (DURATION × 20000), HARNESS_TMP (where the stores live:
# must be a real disk, default /var/tmp), SECTIONS (a subset of "message cold webhooks e2e backlog"),
# LOG_DIR (keep the logs of the relay and the examples there; by default they go with the run),
# RELAY_EXTRA_ENV (more VAR=value words for the relay: traces on, say, with
# "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:18081", the instant stand-in taking the spans),
# RELAY_BIN (another build of the relay to measure: an earlier release, say).
#
# Ceilings (examples built on the relay's library): bench_bare `handler` (token, parse and
# validation, translation, serialization and signature of each JoinChat request, then 200) and
# `forwarder` (the same, then each request sent to the JoinChat stand-in with the relay's
# client, 200 once accepted), neither storing anything; and bench_bare `durable`, the cheapest
# correct durable forwarder (issue 18): the forwarder plus one INSERT into SQLite (WAL,
# synchronous=FULL, one writer thread group-committing) awaited before the send, the delivered
# mark an UPDATE by rowid in the next group, not awaited; its store beside the relay's, fresh
# for each row. Stand-ins: bench_ceiling (200 at once) and bench_joinchat (200 at once, checks
# per-contact order).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"1 64 512"}
BACKLOG=${BACKLOG:-100000}
BACKLOG_CONTACTS=${BACKLOG_CONTACTS:-1000}
E2E_CONTACTS=${E2E_CONTACTS:-1000}
COLD_CONTACTS=${COLD_CONTACTS:-1000}
COLD_IDLE=${COLD_IDLE:-10}
COLD_ROUND=${COLD_ROUND:-8}
WEBHOOK_BATCHES=${WEBHOOK_BATCHES:-$((DURATION * 20000))}
SECTIONS=${SECTIONS:-"message cold webhooks e2e backlog"}
# Another build of the relay for the relay's rows (an earlier release, say); the ceilings and
# stand-ins stay this checkout's.
RELAY_BIN=${RELAY_BIN:-./target/release/bonychat-relay}

STANDIN=127.0.0.1:18081   # bench_ceiling: instant JoinChat and BonyChat (CPU 1)
RELAY=127.0.0.1:18083     # the relay (CPU 0)
BARE=127.0.0.1:18084      # bench_bare (CPU 0)
ORDERED=127.0.0.1:18085   # bench_joinchat (CPU 1)
REFERENCE=127.0.0.1:18086 # bench_ceiling under test (CPU 0)

for tool in taskset wrk curl; do
  if ! command -v $tool >/dev/null; then
    if [[ $tool == wrk && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get install -y wrk >/dev/null
    else
      echo "$tool is missing (apt-get install wrk util-linux curl)" >&2
      exit 1
    fi
  fi
done
[[ $(nproc --all) -ge 2 ]] || { echo "needs two CPUs (0 for the server under test, 1 for the rest)" >&2; exit 1; }

echo "building (release)…" >&2
cargo build --release --locked --quiet --bin bonychat-relay \
  --example bench_ceiling --example bench_bare --example bench_joinchat --example bench_prepare
taskset -cp 1 $$ >/dev/null # this script and all it starts without taskset -c 0 stay on CPU 1

data=$(mktemp -d -p "${HARNESS_TMP:-/var/tmp}" relay-harness.XXXXXX)
if [[ $(stat -f -c %T "$data") == tmpfs ]]; then
  echo "$data is on tmpfs: set HARNESS_TMP to a directory on a real disk" >&2
  exit 1
fi
logs=${LOG_DIR:-$data}
mkdir -p "$logs" bench/results
report=${REPORT:-bench/results/harness-$(date -u +%Y-%m-%d-%H%M).md} # never overwrites an earlier run
: >"$report"

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/common.sh
. bench/common.sh

stop() { # PID: SIGTERM, then SIGKILL after 10 s
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local kept=() p
  for p in "${pids[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  pids=("${kept[@]}")
}

# The relay's variables, shared by the relay and the bench_* examples. JoinChat pacing is off
# (JOINCHAT_ORDER_GAP_SECS=0), the Page's send rate far above the load
# (JOINCHAT_MAX_SENDS_PER_SEC=100000) and the intake caps lifted, so none caps the load.
relay_env() { # JOINCHAT_ADDR SEND_WAIT_MS
  echo PATH="$PATH" RUST_LOG=warn RELAY_ADDR=$RELAY RELAY_METRICS_ADDR=127.0.0.1:19093 \
    BONYCHAT_CHANNEL_ID=bench-channel BONYCHAT_API_TOKEN=bench-token \
    BONYCHAT_WEBHOOK_URL=http://$STANDIN/message \
    JOINCHAT_API_URL=http://$1/api/send_message JOINCHAT_PAGE_ID=510249619162304 \
    JOINCHAT_API_SECRET=bench-secret MESSENGER_APP_SECRET=bench-app-secret MESSENGER_VERIFY_TOKEN=bench \
    JOINCHAT_ORDER_GAP_SECS=0 JOINCHAT_MAX_SENDS_PER_SEC=100000 RELAY_MAX_QUEUED_OUTBOUND=100000000 RELAY_MAX_QUEUED_INBOUND=100000000 RELAY_MAX_QUEUED_PER_CONTACT=100000000 \
    RELAY_SEND_WAIT_MS="$2" RELAY_SHUTDOWN_GRACE_SECS=1 RELAY_DATABASE_URL="sqlite://$data/relay.db" \
    ${RELAY_EXTRA_ENV:-}
}

kb_of() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; } # PID VmRSS|VmHWM
mb() { awk -v kb="$1" 'BEGIN {printf "%.1f MB", kb / 1024}'; }

# start_relay JOINCHAT_ADDR SEND_WAIT_MS: sets RELAY_PID and READY_MS (from the fork to the first
# 200 of /readyz, polled without a pause over /dev/tcp), and IDLE_KB (VmRSS 1 s later).
start_relay() {
  local port=${RELAY#*:} line t0
  t0=$EPOCHREALTIME
  # shellcheck disable=SC2046
  env -i $(relay_env "$1" "$2") taskset -c 0 "$RELAY_BIN" >>"$logs/relay.log" 2>&1 &
  RELAY_PID=$!
  pids+=("$RELAY_PID")
  while :; do
    line=
    { printf 'GET /readyz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n' >&3; IFS= read -r -t 2 line <&3; } \
      2>/dev/null 3<>"/dev/tcp/127.0.0.1/$port" || true
    [[ $line == "HTTP/1.1 200"* ]] && break
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
      echo "the relay stopped; its log:" >&2
      tail -20 "$logs/relay.log" >&2
      exit 1
    fi
    if (($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {print (b - a > 30)}'))); then
      echo "the relay is not ready after 30 s" >&2
      exit 1
    fi
  done
  READY_MS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", (b - a) * 1000}')
  sleep 1
  IDLE_KB=$(kb_of "$RELAY_PID" VmRSS)
}

start_on() { # CPU ADDR MODE-ARGS…: a bench example, with the relay's variables
  local cpu=$1 addr=$2; shift 2
  # shellcheck disable=SC2046
  env -i $(relay_env "$STANDIN" 3000) taskset -c "$cpu" "$@" >>"$logs/examples.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
  wait_for "$addr"
}

stats() { curl -sf "http://$ORDERED/stats"; } # bench_joinchat's counts

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # PID: user + system time, in 1/100 s

# load SCRIPT CONNECTIONS URL [SCRIPT-ARGS…]: one wrk run; sets RPS P50 P99 P999 MAX NON200 and the
# script's extra figures as W_<name>. Non-200 counts non-2xx answers and socket errors (timeouts
# at 10 s included). With SERVER_PID set, also CPU_US: the CPU time that process spent per
# request answered during the run (what the rate would be if the server had its core alone).
load() {
  local script=$1 c=$2 url=$3; shift 3
  local threads=$((c < 2 ? 1 : 2))
  [[ $script == bench/ordered.lua ]] && threads=$c
  local out ticks=0
  [[ -n ${SERVER_PID:-} ]] && ticks=$(cpu_ticks "$SERVER_PID")
  out=$(wrk -t"$threads" -c"$c" -d"${DURATION}s" --timeout 10s -s "$script" "$url" -- "$@" 2>&1) || {
    echo "$out" >&2
    exit 1
  }
  local line
  line=$(grep '^HARNESS ' <<<"$out") || { echo "$out" >&2; exit 1; }
  RPS=$(awk '{print int($3 * 1000000 / $5)}' <<<"$line")
  CPU_US=-
  [[ -n ${SERVER_PID:-} ]] && CPU_US=$(awk -v t="$(($(cpu_ticks "$SERVER_PID") - ticks))" '{printf "%.0f µs", t * 10000 / $3}' <<<"$line")
  P50=$(ms "$(stat_of "$line" p50_us)")
  P99=$(ms "$(stat_of "$line" p99_us)")
  P999=$(ms "$(stat_of "$line" p999_us)")
  MAX=$(ms "$(stat_of "$line" max_us)")
  P99_US=$(stat_of "$line" p99_us)
  NON200=$(($(stat_of "$line" non2xx) + $(stat_of "$line" socket_errors)))
  W_wraps=$(stat_of "$line" wraps)
  W_accepted=$(stat_of "$line" accepted)
  grep '^unexpected' <<<"$out" | head -3 >&2 || true
}

row() { say "| $1 | $2 | $RPS | $P50 | $P99 | $P999 | $NON200 | $CPU_US |"; }

commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src examples bench/*.sh bench/*.lua Cargo.toml Cargo.lock || commit="$commit + uncommitted changes"
[[ $RELAY_BIN == ./target/release/bonychat-relay ]] || commit="$commit, with the relay $RELAY_BIN"
[[ -z ${RELAY_EXTRA_ENV:-} ]] || commit="$commit, the relay with $RELAY_EXTRA_ENV"
say "# Relay harness, $(date -u '+%Y-%m-%d %H:%M UTC')"
say
say "Commit $commit; $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); \
$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); stores in $(dirname "$data") \
($(stat -f -c %T "$data")); release build; ${DURATION} s per load run; \`bash bench/harness.sh\`."
fsync_ms=$(dd if=/dev/zero of="$data/dd" bs=4k count=200 oflag=dsync 2>&1 |
  awk '/copied/ {for (i = 1; i < NF; i++) if ($(i + 1) == "s,") printf "%.2f", $i * 1000 / 200}')
rm -f "$data/dd"
say "Before the run: load average $(cut -d' ' -f1-3 /proc/loadavg); a 4 KiB write with \`oflag=dsync\` in the store's directory takes $fsync_ms ms."
say "Server under test on CPU 0; wrk (\`-t2\`, \`-t1\` for one connection), the stand-ins and the script on CPU 1."
say "The relay: SQLite (a fresh store for each row, as for the durable forwarder), \`JOINCHAT_ORDER_GAP_SECS=0\`, intake caps lifted, logs at warn."
say

want() { [[ " $SECTIONS " == *" $1 "* ]]; }
declare -A rps_of p99_of cpu_of
starts=() # "label|ready ms|idle kB|end kB|peak kB", one per start of the relay on an empty store

# ---------------------------------------------------------------------------------------------
./target/release/examples/bench_ceiling $STANDIN >>"$logs/examples.log" 2>&1 &
pids+=($!)
wait_for $STANDIN

if want message; then
say "## POST /message"
say
say "BonyChat text messages spread over 100 000 contacts (\`bench/message.lua\`); JoinChat is the"
say "instant stand-in (\`bench_ceiling\`). p99.9 from wrk's histogram (\`done()\` in the script). CPU per"
say "request: the user and system time of the server under test over the run, divided by the requests it"
say "answered (from \`/proc/<pid>/stat\`): the cost of a request whether or not the server filled its core."
say
say "| server | connections | requests/s | p50 | p99 | p99.9 | non-200 | server CPU per request |"
say "|---|---|---|---|---|---|---|---|"

note "reference: bench_ceiling under test"
taskset -c 0 ./target/release/examples/bench_ceiling $REFERENCE >>"$logs/examples.log" 2>&1 &
pids+=($!)
wait_for $REFERENCE
SERVER_PID=${pids[-1]}
load bench/message.lua 64 "http://$REFERENCE"
row "reference: bench_ceiling (200 at once, body not read): about what wrk on one CPU can drive" 64
stop "${pids[-1]}"

for mode in handler forwarder; do
  note "bare $mode"
  start_on 0 $BARE ./target/release/examples/bench_bare $mode $BARE
  SERVER_PID=$LAST_PID
  for c in $CONNECTIONS; do
    load bench/message.lua "$c" "http://$BARE"
    row "ceiling: bare $mode" "$c"
    rps_of[$mode.$c]=$RPS
    cpu_of[$mode.$c]=$CPU_US
  done
  stop "$LAST_PID"
done

for c in $CONNECTIONS; do
  note "durable forwarder, $c connections"
  rm -f "$data"/durable.db*
  start_on 0 $BARE ./target/release/examples/bench_bare durable $BARE "$data/durable.db"
  SERVER_PID=$LAST_PID
  load bench/message.lua "$c" "http://$BARE"
  row "ceiling: durable forwarder (one INSERT awaited, delivered mark in the next group)" "$c"
  rps_of[durable.$c]=$RPS
  cpu_of[durable.$c]=$CPU_US
  p99_of[durable.$c]=$P99_US
  stop "$LAST_PID"
done

for wait_ms in 3000 0; do
  label="relay, default (RELAY_SEND_WAIT_MS=3000)"
  [[ $wait_ms == 0 ]] && label="relay, RELAY_SEND_WAIT_MS=0"
  for c in $CONNECTIONS; do
    note "$label, $c connections"
    rm -f "$data"/relay.db*
    start_relay $STANDIN $wait_ms
    SERVER_PID=$RELAY_PID
    load bench/message.lua "$c" "http://$RELAY"
    row "$label" "$c"
    rps_of[relay$wait_ms.$c]=$RPS
    cpu_of[relay$wait_ms.$c]=$CPU_US
    p99_of[relay$wait_ms.$c]=$P99_US
    starts+=("$label, $c connections|$READY_MS|$IDLE_KB|$(kb_of "$RELAY_PID" VmRSS)|$(kb_of "$RELAY_PID" VmHWM)")
    stop "$RELAY_PID"
  done
done
SERVER_PID=
say
fi

# ---------------------------------------------------------------------------------------------
if want cold; then
say "## A round after an idle pause"
say
say "What a request waits for besides its own work shows after a pause: \`bench/message.lua\` over"
say "$COLD_CONTACTS contacts (so requests to one contact overlap), 64 connections, default"
say "\`RELAY_SEND_WAIT_MS=3000\`, JoinChat the instant stand-in. A 2 s warm-up (its end cuts 64 requests off"
say "mid-flight, as clients that hang up do), ${COLD_IDLE} s idle, then two rounds of ${COLD_ROUND} s back to back."
say
say "| round | requests/s | p50 | p99 | p99.9 | max | non-200 |"
say "|---|---|---|---|---|---|---|"
rm -f "$data"/relay.db*
start_relay $STANDIN 3000
SERVER_PID=
export CONTACTS=$COLD_CONTACTS
DURATION=2 load bench/message.lua 64 "http://$RELAY"
say "| warm-up (2 s) | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 |"
sleep "$COLD_IDLE"
DURATION=$COLD_ROUND load bench/message.lua 64 "http://$RELAY"
say "| after ${COLD_IDLE} s idle | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 |"
DURATION=$COLD_ROUND load bench/message.lua 64 "http://$RELAY"
say "| warm, right after | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 |"
unset CONTACTS
stop "$RELAY_PID"
say
fi

# ---------------------------------------------------------------------------------------------
if want webhooks; then
note "webhooks: generating $WEBHOOK_BATCHES signed batches"
# shellcheck disable=SC2046
env -i $(relay_env $STANDIN 3000) ./target/release/examples/bench_prepare webhooks "$data/webhooks.txt" \
  "$WEBHOOK_BATCHES" 3
export WEBHOOK_FILE=$data/webhooks.txt
say "## Signed Messenger webhooks"
say
say "$WEBHOOK_BATCHES distinct batches made beforehand (\`bench_prepare webhooks\`): a page envelope with 3 text"
say "messages each, unique mids, senders cycling over 100 000, \`X-Hub-Signature-256\` over the exact body;"
say "each wrk thread sends its half in order (\`bench/webhook.lua\`). BonyChat is the instant stand-in."
say
say "| server | connections | batches acknowledged/s | p50 | p99 | p99.9 | non-200 | batches sent more than once |"
say "|---|---|---|---|---|---|---|---|"
start_on 0 $BARE ./target/release/examples/bench_bare handler $BARE
load bench/webhook.lua 64 "http://$BARE" 2
say "| ceiling: bare handler (signature check and envelope parse, nothing stored) | 64 | $RPS | $P50 | $P99 | $P999 | $NON200 | ${W_wraps:-0} wrap(s) (no deduplication here) |"
stop "$LAST_PID"
rm -f "$data"/relay.db*
start_relay $STANDIN 3000
load bench/webhook.lua 64 "http://$RELAY" 2
repeats=none
((W_wraps > 0)) && repeats="yes: the file wrapped $W_wraps time(s); repeats are duplicates to the relay"
say "| relay (stored, then forwarded to BonyChat) | 64 | $RPS | $P50 | $P99 | $P999 | $NON200 | $repeats |"
webhook_rps=$RPS
starts+=("relay, webhooks, 64 connections|$READY_MS|$IDLE_KB|$(kb_of "$RELAY_PID" VmRSS)|$(kb_of "$RELAY_PID" VmHWM)")
stop "$RELAY_PID"
rm -f "$data/webhooks.txt"
say
fi

# ---------------------------------------------------------------------------------------------
if want e2e; then
say "## End to end, per-contact order"
say
say "$E2E_CONTACTS contacts; \`bench/ordered.lua\` with 64 threads of one connection each, so a contact never"
say "has two requests in flight and its texts \`c<contact> n<k>\` are accepted in order. The relay with"
say "\`RELAY_SEND_WAIT_MS=0\` (answers once stored, so a contact's messages queue up); JoinChat is"
say "\`bench_joinchat\`, which counts arrivals per recipient (out of order, duplicates, missing numbers)."
say
say "| relay | messages accepted (200) | accepted/s | delivered/s during the load | delivered/s until all accepted arrived | out of order | duplicates | missing | bad signatures | non-200 |"
say "|---|---|---|---|---|---|---|---|---|---|"
note "end to end"
taskset -c 1 ./target/release/examples/bench_joinchat $ORDERED >>"$logs/examples.log" 2>&1 &
pids+=($!)
wait_for $ORDERED
rm -f "$data"/relay.db*
start_relay $ORDERED 0
export CONTACTS=$E2E_CONTACTS
t0=$EPOCHREALTIME
load bench/ordered.lua 64 "http://$RELAY" 64
t1=$EPOCHREALTIME
during=$(stat_of "$(stats)" delivered)
e2e_end_kb=$(kb_of "$RELAY_PID" VmRSS)
# Then until everything accepted has arrived (up to 120 s). The requests in flight when wrk
# stopped may have been stored without wrk counting their 200: delivered can exceed accepted.
for _ in $(seq 1200); do
  after=$(stats)
  unique=$(($(stat_of "$after" delivered) - $(stat_of "$after" duplicates)))
  ((unique >= W_accepted)) && break
  sleep 0.1
done
t2=$EPOCHREALTIME
sleep 1 # stragglers
after=$(stats)
unique=$(($(stat_of "$after" delivered) - $(stat_of "$after" duplicates)))
e2e_out_of_order=$(stat_of "$after" out_of_order)
e2e_duplicates=$(stat_of "$after" duplicates)
e2e_rate=$(awk -v n="$during" -v a="$t0" -v b="$t1" 'BEGIN {printf "%d", n / (b - a)}')
say "| RELAY_SEND_WAIT_MS=0 | $W_accepted | $RPS | $e2e_rate | \
$(awk -v n="$W_accepted" -v a="$t0" -v b="$t2" 'BEGIN {printf "%d (all in %.1f s)", n / (b - a), b - a}') | \
$e2e_out_of_order | $e2e_duplicates | $(stat_of "$after" missing) | $(stat_of "$after" bad_signature) | $NON200 |"
say
say "Arrived at the stand-in in all: $unique distinct messages to $(stat_of "$after" contacts) recipients (accepted: $W_accepted)."
starts+=("relay, end to end, 64 connections|$READY_MS|$IDLE_KB|$e2e_end_kb|$(kb_of "$RELAY_PID" VmHWM)")
stop "$RELAY_PID"
stop "${pids[-1]}"
say
fi

# ---------------------------------------------------------------------------------------------
if want backlog; then
say "## A backlog of $BACKLOG queued jobs"
say
note "backlog: enqueueing $BACKLOG jobs"
rm -f "$data"/relay.db*
# shellcheck disable=SC2046
prepared=$(env -i $(relay_env $ORDERED 3000) taskset -c 0 ./target/release/examples/bench_prepare backlog \
  "$BACKLOG" "$BACKLOG_CONTACTS")
taskset -c 1 ./target/release/examples/bench_joinchat $ORDERED >>"$logs/examples.log" 2>&1 &
pids+=($!)
wait_for $ORDERED
note "backlog: restarting the relay on it and draining"
t0=$EPOCHREALTIME
start_relay $ORDERED 3000
backlog_ready=$READY_MS
backlog_idle_kb=$IDLE_KB
# The delivered count every 0.1 s (kept about once a second: a read takes a few ms) until all arrived, up to 600 s.
counts=()
half_at=
tick=0
while :; do
  n=$(stat_of "$(stats)" delivered)
  now=$EPOCHREALTIME
  ((tick++ % 10 == 0)) && counts+=("$n")
  [[ -z $half_at ]] && ((n >= BACKLOG / 2)) && half_at=$now
  ((n >= BACKLOG)) && break
  if (($(awk -v a="$t0" -v b="$now" 'BEGIN {print (b - a > 600)}'))); then break; fi
  sleep 0.1
done
t_end=$EPOCHREALTIME
after=$(stats)
drain_peak_kb=$(kb_of "$RELAY_PID" VmHWM)
stop "$RELAY_PID"
stop "${pids[-1]}"
say "$prepared (\`bench_prepare backlog\`, the relay's store API, the relay stopped); texts \`c<contact> n<k>\`"
say "in order per contact. Then the relay was started on it with \`bench_joinchat\` as JoinChat (200 at once)."
say
say "- start to \`/readyz\` 200 with the backlog: $backlog_ready ms; resident 1 s after ready (draining): $(mb "$backlog_idle_kb")"
say "- delivered: $(stat_of "$after" delivered) in $(awk -v a="$t0" -v b="$t_end" 'BEGIN {printf "%.1f s", b - a}') from the start \
($(awk -v n="$(stat_of "$after" delivered)" -v a="$t0" -v b="$t_end" 'BEGIN {printf "%d", n / (b - a)}')/s); \
out of order $(stat_of "$after" out_of_order), duplicates $(stat_of "$after" duplicates), missing $(stat_of "$after" missing)"
if [[ -n $half_at ]]; then
  say "- first half ($((BACKLOG / 2)) jobs): $(awk -v n=$((BACKLOG / 2)) -v a="$t0" -v b="$half_at" 'BEGIN {printf "%d/s", n / (b - a)}'); \
second half: $(awk -v n=$((BACKLOG - BACKLOG / 2)) -v a="$half_at" -v b="$t_end" 'BEGIN {printf "%d/s", n / (b - a)}') (times from the relay's start, read every 0.1 s)"
fi
say "- delivered in each sample of about 1 s (counted by the stand-in; the first figure covers the start and the 1 s after ready, the last the remainder): \
$(prev=0; out=(); for n in "${counts[@]}"; do out+=($((n - prev))); prev=$n; done; echo "${out[*]}")"
say "- peak resident while draining (VmHWM): $(mb "$drain_peak_kb")"
say
fi

# ---------------------------------------------------------------------------------------------
say "## Memory and start"
say
say "Start: from the fork of the relay (through \`env\` and \`taskset\`) to the first 200 of \`/readyz\`,"
say "polled without pause; each row started on an empty store. Resident: VmRSS 1 s after ready, VmRSS at"
say "the end of the load, VmHWM (peak) at the end."
say
say "| relay run | start to ready | resident idle | resident at end of load | peak resident |"
say "|---|---|---|---|---|"
max_end=0; max_idle=0; max_peak=0
readies=()
for entry in "${starts[@]}"; do
  IFS='|' read -r label ready idle end peak <<<"$entry"
  say "| $label | $ready ms | $(mb "$idle") | $(mb "$end") | $(mb "$peak") |"
  readies+=("$ready")
  ((idle > max_idle)) && max_idle=$idle
  ((end > max_end)) && max_end=$end
  ((peak > max_peak)) && max_peak=$peak
done
ready_median=$(printf '%s\n' "${readies[@]:-?}" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
ready_max=$(printf '%s\n' "${readies[@]:-?}" | sort -n | tail -1)
say

# ---------------------------------------------------------------------------------------------
verdict() { if (($(awk "BEGIN {print ($1) ? 1 : 0}"))); then echo met; else echo "not met"; fi; }
target() { # FIGURE MEASURED TARGET CONDITION: a row, or "not measured" when a figure is missing
  if [[ $2 == *'?'* ]]; then say "| $1 | not measured | $3 | |"; else say "| $1 | $2 | $3 | $(verdict "$4") |"; fi
}
relay64=${rps_of[relay3000.64]:-?} forwarder64=${rps_of[forwarder.64]:-?}
accept_ratio=$(awk -v a="$relay64" -v b="$forwarder64" 'BEGIN {printf "%.2f", a / (b ? b : 1)}')
p99_ms=$(awk -v us="${p99_of[relay3000.64]:-0}" 'BEGIN {printf "%.2f", us / 1000}')
[[ -n ${p99_of[relay3000.64]:-} ]] || p99_ms='?'
say "## Against the targets of issue 10"
say
say "| figure | measured | target | |"
say "|---|---|---|---|"
target "relay default ÷ bare forwarder, requests/s at 64 connections" "$relay64 ÷ $forwarder64 = $accept_ratio" "≥ 0.8" "$accept_ratio >= 0.8"
target "relay default p99 at 64 connections" "$p99_ms ms" "< 10 ms" "$p99_ms < 10"
target "resident idle (largest of the starts above)" "$(mb "$max_idle")" "< 30 MB" "$max_idle < 30 * 1024"
target "resident under load (largest VmRSS at the end of a load; largest peak $(mb "$max_peak"))" "$(mb "$max_end")" "< 100 MB" "$max_end < 100 * 1024"
target "start to ready, empty store (median; largest)" "$ready_median ms; $ready_max ms" "< 100 ms" "$ready_max < 100"
target "start to ready, $BACKLOG queued" "${backlog_ready:-?} ms" "< 1 s" "${backlog_ready:-0} < 1000"
target "end to end: out of order, duplicates" "${e2e_out_of_order:-?}, ${e2e_duplicates:-?}" "0, 0" "${e2e_out_of_order:-0} + ${e2e_duplicates:-0} == 0"
say
if [[ -n ${cpu_of[relay3000.64]:-} && -n ${cpu_of[forwarder.64]:-} ]]; then
  say "CPU per request at 64 connections: relay default ${cpu_of[relay3000.64]}, bare forwarder ${cpu_of[forwarder.64]}, \
bare handler ${cpu_of[handler.64]:-?}. The relay reaches 0.8 of the forwarder's rate only once its CPU per request is \
within 1.25× the forwarder's."
fi
say
durable64=${rps_of[durable.64]:-?}
durable_ratio=$(awk -v a="$relay64" -v b="$durable64" 'BEGIN {printf "%.2f", a / (b ? b : 1)}')
durable_p99_ms=$(awk -v us="${p99_of[durable.64]:-0}" 'BEGIN {printf "%.2f", us / 1000}')
[[ -n ${p99_of[durable.64]:-} ]] || durable_p99_ms='?'
p99_ratio=$(awk -v a="${p99_of[relay3000.64]:-0}" -v b="${p99_of[durable.64]:-0}" 'BEGIN {printf "%.2f", a / (b ? b : 1)}')
cpu_num() { local v=${cpu_of[$1]:-?}; echo "${v% µs}"; } # KEY: the µs figure, or ? when not measured
say "## Against the targets of issue 18"
say
say "| figure | measured | target | |"
say "|---|---|---|---|"
target "relay default ÷ durable forwarder, requests/s at 64 connections" "$relay64 ÷ $durable64 = $durable_ratio" "≥ 0.9" "$durable_ratio >= 0.9"
target "relay default p99 ÷ durable forwarder p99 at 64 connections" "$p99_ms ms ÷ $durable_p99_ms ms = $p99_ratio" "≤ 2" "$p99_ratio <= 2"
cpu_line="bare forwarder $(cpu_num forwarder.64) µs; durable forwarder $(cpu_num durable.64) µs; relay default $(cpu_num relay3000.64) µs"
cpu_need=$(awk -v d="$(cpu_num durable.64)" 'BEGIN {if (d + 0 > 0) printf "≤ %.0f µs", d / 0.9; else print "?"}')
say "| CPU per request at 64 connections | $cpu_line | (0.9 needs the relay within 1.11× the durable forwarder's: $cpu_need) | |"
say
[[ -n ${webhook_rps:-} ]] && say "Signed webhooks acknowledged at 64 connections: $webhook_rps batches/s."
say "MB are MiB (kB of /proc ÷ 1024). After the run: load average $(cut -d' ' -f1-3 /proc/loadavg); CPU pressure \
$(awk '/^some/ {print $4}' /proc/pressure/cpu 2>/dev/null || echo '(no PSI)'), I/O pressure $(awk '/^some/ {print $4}' /proc/pressure/io 2>/dev/null || echo '(no PSI)') \
(the harness alone keeps both CPUs busy; figures far from an earlier run's mean another load shared the machine)."
echo "written to $report" >&2
