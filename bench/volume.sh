#!/usr/bin/env bash
# The relay where production lives (issue 15): a store holding a long history, and a queue
# holding an outage's backlog. Each figure is beside the same run without the volume, on the same
# store, so the difference is what the volume costs. Prints a Markdown report and writes it to
# bench/results/volume-<date>-<HHMM>.md (UTC).
#
#   bash bench/volume.sh                          # both sections, both stores: about 8 minutes
#   SECTIONS=history STORES=sqlite bash bench/volume.sh
#   RELAY_BIN=/elsewhere/bonychat-relay bash bench/volume.sh   # another build, same runs
#
# - history: HISTORY (2 000 000) delivered jobs, written straight into the store's tables (the
#   relay stopped), delivered evenly over the last 14 days (the oldest first, as a relay writes
#   them). /message at 64 connections for HISTORY_DURATION (30) s, once with RELAY_RETENTION=30d
#   (nothing to prune; the load starts 5 s after the relay, past its start-up prune) and once
#   with the default 7d, the load starting with the relay: it then prunes the older half in the
#   background, and finds where the rest begins, while the load runs. /readyz is polled every
#   100 ms meanwhile.
# - backlog: /message intake (RELAY_SEND_WAIT_MS=0: stored, then answered) at 64 connections for
#   DURATION s with JoinChat down (503 to every send) and RELAY_RETRY_JOINCHAT=1h, as in an
#   outage. First on an empty queue, then with BACKLOG (100 000) messages waiting for their
#   retry. Both stores first take BACKLOG messages through /message (each request making its own
#   first attempt): delivered for the empty queue, refused by the downed JoinChat for the
#   backlog; so both runs start on a store of the same size.
#
# The relay runs on CPU 0; wrk, the stand-in, PostgreSQL (a durable throwaway cluster of
# scripts/test-postgres on port 54339) and this script on CPU 1. Stores under HARNESS_TMP
# (default /var/tmp: a real disk, not tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-20}
HISTORY_DURATION=${HISTORY_DURATION:-30}
HISTORY=${HISTORY:-2000000}
BACKLOG=${BACKLOG:-100000}
SECTIONS=${SECTIONS:-"history backlog"}
# Another build of the relay to measure with the same script (an earlier release, say).
RELAY_BIN=${RELAY_BIN:-./target/release/bonychat-relay}
STORES=${STORES:-"sqlite postgres"}

STANDIN=127.0.0.1:18181
RELAY=127.0.0.1:18183
METRICS=127.0.0.1:19183
PG_PORT=54339

for tool in taskset wrk curl python3; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install wrk util-linux curl python3)" >&2; exit 1; }
done
echo "building (release)…" >&2
cargo build --release --locked --quiet --bin bonychat-relay --example bench_ceiling
taskset -cp 1 $$ >/dev/null

data=$(mktemp -d -p "${HARNESS_TMP:-/var/tmp}" relay-volume.XXXXXX)
[[ $(stat -f -c %T "$data") != tmpfs ]] || { echo "$data is on tmpfs: set HARNESS_TMP" >&2; exit 1; }
chmod 755 "$data" # PostgreSQL's cluster lives in it, run by its own user
mkdir -p bench/results
report=${REPORT:-bench/results/volume-$(date -u +%Y-%m-%d-%H%M).md}
: >"$report"
export RELAY_TEST_PG_DIR=$data/pg RELAY_TEST_PG_PORT=$PG_PORT RELAY_TEST_PG_DURABLE=1

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ " $STORES " == *" postgres "* ]] && scripts/test-postgres stop >/dev/null 2>&1
  rm -rf "$data"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/common.sh
. bench/common.sh

standin() { # STATUS: the JoinChat stand-in, answering every send with STATUS
  [[ -n ${STANDIN_PID:-} ]] && { kill "$STANDIN_PID"; wait "$STANDIN_PID" 2>/dev/null || true; }
  ./target/release/examples/bench_ceiling $STANDIN "$1" >/dev/null 2>&1 &
  STANDIN_PID=$!
  pids+=("$STANDIN_PID")
  wait_for $STANDIN
}

database_url() { # STORE
  case $1 in
    sqlite) echo "sqlite://$data/relay.db" ;;
    postgres) echo "postgres://relay@127.0.0.1:$PG_PORT/volume" ;;
  esac
}

fresh_store() { # STORE
  case $1 in
    sqlite) rm -f "$data"/relay.db* ;;
    postgres)
      scripts/test-postgres psql -q -c "DROP DATABASE IF EXISTS volume" -c "CREATE DATABASE volume" >/dev/null
      ;;
  esac
}

sql() { # STORE SQL: run on the store (the relay may be running: SQLite readers share the file)
  case $1 in
    sqlite) python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=30); r = c.execute(sys.argv[2]).fetchall(); c.commit(); print(*(v for row in r for v in row))' "$data/relay.db" "$2" ;;
    postgres) PGOPTIONS="-c statement_timeout=0" psql -Atq "$(database_url postgres)" -c "$2" ;;
  esac
}

start_relay() { # STORE [VAR=VALUE…]: the relay on CPU 0, until /readyz answers 200
  local store=$1; shift
  env -i PATH="$PATH" RUST_LOG=warn RELAY_ADDR=$RELAY RELAY_METRICS_ADDR=$METRICS \
    BONYCHAT_CHANNEL_ID=bench-channel BONYCHAT_API_TOKEN=bench-token BONYCHAT_WEBHOOK_URL=http://$STANDIN/message \
    JOINCHAT_API_URL=http://$STANDIN/api/send_message JOINCHAT_PAGE_ID=510249619162304 \
    JOINCHAT_API_SECRET=bench-secret MESSENGER_APP_SECRET=bench-app-secret MESSENGER_VERIFY_TOKEN=bench \
    JOINCHAT_ORDER_GAP_SECS=0 JOINCHAT_MAX_SENDS_PER_SEC=100000 RELAY_SHUTDOWN_GRACE_SECS=1 RELAY_DATABASE_URL="$(database_url "$store")" \
    RELAY_DATABASE_POOL_SIZE=16 RELAY_MAX_QUEUED_OUTBOUND=1000000 "$@" \
    taskset -c 0 "$RELAY_BIN" >>"$data/relay.log" 2>&1 &
  RELAY_PID=$!
  pids+=("$RELAY_PID")
  local _
  for _ in $(seq 600); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$RELAY/readyz") == 200 ]] && return
    kill -0 "$RELAY_PID" 2>/dev/null || { tail -20 "$data/relay.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "the relay is not ready after 60 s" >&2
  exit 1
}

stop_relay() {
  kill "$RELAY_PID" 2>/dev/null || true
  wait "$RELAY_PID" 2>/dev/null || true
}

# load: /message at 64 connections for DURATION s; sets RPS P50 P99 P999 MAX NON200.
load() {
  local out line
  out=$(CONTACTS=100000 wrk -t2 -c64 -d"${DURATION}s" --timeout 10s -s bench/message.lua "http://$RELAY" 2>&1) || {
    echo "$out" >&2
    exit 1
  }
  line=$(grep '^HARNESS ' <<<"$out") || { echo "$out" >&2; exit 1; }
  RPS=$(awk '{print int($3 * 1000000 / $5)}' <<<"$line")
  P50=$(ms "$(stat_of "$line" p50_us)")
  P99=$(ms "$(stat_of "$line" p99_us)")
  P999=$(ms "$(stat_of "$line" p999_us)")
  MAX=$(ms "$(stat_of "$line" max_us)")
  NON200=$(($(stat_of "$line" non2xx) + $(stat_of "$line" socket_errors)))
}

# polled_load: load, with /readyz polled every 100 ms meanwhile; sets NOT_READY (polls not 200).
polled_load() {
  local polls=$data/polls
  : >"$polls"
  (while :; do curl -s -o /dev/null -m 2 -w '%{http_code}\n' "http://$RELAY/readyz" >>"$polls"; sleep 0.1; done) &
  local poller=$!
  load
  kill $poller
  wait $poller 2>/dev/null || true
  NOT_READY="$(grep -vc '^200$' "$polls" || true) of $(wc -l <"$polls")"
}

say "# Volume: history and backlog, $(date -u '+%Y-%m-%d %H:%M UTC')"
say
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src examples bench Cargo.toml Cargo.lock migrations || commit="$commit + uncommitted changes"
[[ $RELAY_BIN == ./target/release/bonychat-relay ]] || commit="relay $RELAY_BIN ($("$RELAY_BIN" --version 2>/dev/null || echo 'version unknown')), script of $commit"
say "Commit $commit; $(nproc --all) CPUs; release build; relay on CPU 0, wrk, the stand-in and PostgreSQL on CPU 1;"
say "/message at 64 connections for $DURATION s over 100 000 contacts (\`bench/message.lua\`); \`bash bench/volume.sh\`."
say "Before the run: load average $(cut -d' ' -f1-3 /proc/loadavg)."
say

if [[ " $STORES " == *" postgres "* ]]; then
  note "PostgreSQL (durable) on port $PG_PORT"
  taskset -c 1 scripts/test-postgres start >/dev/null
fi

# -------------------------------------------------------------------------------------------
if [[ " $SECTIONS " == *" history "* ]]; then
say "## A store holding $HISTORY delivered jobs"
say
say "Delivered evenly over the last 14 days. With \`RELAY_RETENTION=30d\` nothing is due for pruning;"
say "with the default 7d the relay prunes the older half from its start, while the load ($HISTORY_DURATION s) runs."
say
say "| store | retention | requests/s | p50 | p99 | p99.9 | max | non-200 | /readyz not 200 | history left after the load |"
say "|---|---|---|---|---|---|---|---|---|---|"
standin 200
for store in $STORES; do
  for retention in 30d 7d; do
    note "history: $store, retention $retention"
    fresh_store "$store"
    start_relay "$store"
    stop_relay
    oldest=$(( $(date +%s%3N) - 14 * 86400000 ))
    step=$(( 14 * 86400000 / HISTORY ))
    payload='{"v":1,"kind":"send","recipient":{"id":"1000000000000000"},"parts":[{"template_type":"text","text":"A message from the history of this store, about as long as a chat reply"}]}'
    case $store in
      sqlite)
        sql sqlite "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < $HISTORY)
          INSERT INTO jobs (direction, contact, m_id, payload, state, attempts, progress, next_attempt_at, accepted_at,
                            delivered_reported, read_reported, created_at, updated_at)
          SELECT 'outbound', printf('%d', 1000000000000000 + n % 100000), printf('history%d', n), '$payload',
                 'delivered', 1, 1, $oldest + n * $step, $oldest + n * $step, 1, 1, $oldest + n * $step,
                 $oldest + n * $step FROM s" >/dev/null
        ;;
      postgres)
        sql postgres "INSERT INTO jobs (direction, contact, m_id, payload, state, attempts, progress, next_attempt_at,
                            accepted_at, delivered_reported, read_reported, created_at, updated_at)
          SELECT 'outbound', (1000000000000000 + n % 100000)::text, 'history' || n, '$payload',
                 'delivered', 1, 1, $oldest + n * $step, $oldest + n * $step, true, true, $oldest + n * $step,
                 $oldest + n * $step
          FROM generate_series(1, $HISTORY) n" >/dev/null
        sql postgres "VACUUM ANALYZE jobs" >/dev/null
        ;;
    esac
    start_relay "$store" RELAY_RETENTION=$retention
    [[ $retention == 30d ]] && sleep 5
    DURATION=$HISTORY_DURATION polled_load
    left=$(sql "$store" "SELECT COUNT(*) FROM jobs WHERE m_id LIKE 'history%'")
    stop_relay
    say "| $store | $retention | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 | $NOT_READY | $left |"
  done
done
say
fi

# -------------------------------------------------------------------------------------------
if [[ " $SECTIONS " == *" backlog "* ]]; then
say "## Intake with an outage's backlog"
say
say "JoinChat answers 503 to every send and \`RELAY_RETRY_JOINCHAT=1h\`: each message is attempted once,"
say "then waits for its retry. \`RELAY_SEND_WAIT_MS=0\`: a request is answered once its message is stored."
say "Before each run the store took $BACKLOG messages through \`/message\`: delivered (the empty queue) or"
say "refused by the downed JoinChat (the backlog), so both runs start on a store of the same size."
say
say "| store | queued before the run | requests/s | p50 | p99 | p99.9 | max | non-200 | ratio to the empty queue |"
say "|---|---|---|---|---|---|---|---|---|"
for store in $STORES; do
  for phase in empty backlog; do
    note "backlog: $store, $phase: $BACKLOG messages first"
    fresh_store "$store"
    if [[ $phase == empty ]]; then standin 200; else standin 503; fi
    # Each request takes its own first attempt: nothing is left for the workers to catch up on.
    start_relay "$store" RELAY_RETRY_JOINCHAT=1h
    CONTACTS=100000 CONTACT_OFFSET=500000 wrk -t2 -c64 -d3600s --timeout 10s -s bench/message.lua "http://$RELAY" \
      >/dev/null 2>&1 &
    filler=$!
    while (($(sql "$store" "SELECT COUNT(*) FROM jobs WHERE direction = 'outbound'") < BACKLOG)); do sleep 1; done
    kill $filler
    wait $filler 2>/dev/null || true
    stop_relay
    standin 503
    start_relay "$store" RELAY_RETRY_JOINCHAT=1h RELAY_SEND_WAIT_MS=0
    queued=$(sql "$store" "SELECT COUNT(*) FROM jobs WHERE direction = 'outbound' AND state = 'queued'")
    load
    [[ $phase == empty ]] && empty_rps=$RPS
    ratio=$(awk -v a="$RPS" -v b="$empty_rps" 'BEGIN {printf "%.2f", a / b}')
    stop_relay
    say "| $store | $queued | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 | $ratio |"
  done
done
say
fi

say "After the run: load average $(cut -d' ' -f1-3 /proc/loadavg)."
echo "written to $report" >&2
