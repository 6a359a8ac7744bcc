#!/usr/bin/env bash
# Throughput and latency of POST /message with the durable store, against a bare axum handler
# that answers 200 at once (the ceiling). Needs wrk (apt-get install wrk).
#
#   bash bench/run.sh            # 15 s per run
#   DURATION=30 bash bench/run.sh
#   ONLY=postgres bash bench/run.sh   # the Postgres part alone
#   POOL_SIZE=32 ONLY=postgres bash bench/run.sh   # RELAY_DATABASE_POOL_SIZE (default 10)
#
# Everything runs on this machine: wrk, the servers, and for the relay runs an instant JoinChat
# (the same bare server on another port) that every stored message is delivered to.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15}
CEILING_ADDR=127.0.0.1:18081
JOINCHAT_ADDR=127.0.0.1:18082
RELAY_ADDR=127.0.0.1:18083

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --locked --quiet --bin bonychat-relay --example bench_ceiling

pids=()
data=$(mktemp -d)
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

wait_for() { for _ in $(seq 100); do (echo > "/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return; sleep 0.1; done; echo "no server on $1" >&2; exit 1; }

# run LABEL CONNECTIONS URL: one wrk run, printed as a table row.
run() {
  local out
  out=$(wrk -t2 -c"$2" -d"${DURATION}s" --latency -s bench/message.lua "$3" 2>&1 | grep -v '^unexpected')
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec/ {printf "%d", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$rps" "$p50" "$p99" "${errors:-0}"
}

# The intake cap is lifted: answering once stored, the relay accepts faster than per-contact
# pacing lets it deliver, so with the default cap (100 000 queued) the queue fills within
# seconds and the rest is refused with 503 queue_full: the cap doing its job, not throughput.
relay() { # relay SEND_WAIT_MS [DATABASE_URL [ADDR [METRICS_ADDR]]]: a fresh SQLite store by default
  rm -rf "$data"/relay.db*
  local addr=${3:-$RELAY_ADDR}
  env -i PATH="$PATH" RUST_LOG=warn RELAY_ADDR="$addr" RELAY_METRICS_ADDR="${4:-127.0.0.1:19090}" \
    BONYCHAT_CHANNEL_ID=bench-channel BONYCHAT_API_TOKEN=bench-token \
    BONYCHAT_WEBHOOK_URL=http://$JOINCHAT_ADDR/webhook \
    JOINCHAT_API_URL=http://$JOINCHAT_ADDR/api/send_message JOINCHAT_PAGE_ID=510249619162304 \
    JOINCHAT_API_SECRET=bench-secret MESSENGER_APP_SECRET=bench MESSENGER_VERIFY_TOKEN=bench \
    RELAY_DATABASE_URL="${2:-sqlite://$data/relay.db}" RELAY_SEND_WAIT_MS="$1" JOINCHAT_MAX_SENDS_PER_SEC=100000 \
    RELAY_MAX_QUEUED_OUTBOUND=100000000 RELAY_MAX_QUEUED_PER_CONTACT=100000000 RELAY_DATABASE_POOL_SIZE="${POOL_SIZE:-10}" \
    ./target/release/bonychat-relay &
  pids+=($!)
  wait_for "$addr"
}

stop_relay() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

./target/release/examples/bench_ceiling $CEILING_ADDR & pids+=($!)
./target/release/examples/bench_ceiling $JOINCHAT_ADDR & pids+=($!)
wait_for $CEILING_ADDR
wait_for $JOINCHAT_ADDR

if [[ ${ONLY:-} != postgres ]]; then
echo "| server | connections | requests/s | p50 | p99 | non-200 |"
echo "|---|---|---|---|---|---|"
for c in 64 256; do run "ceiling: bare axum handler" "$c" "http://$CEILING_ADDR"; done
relay 0
# Reference: the same requests for another channel are refused after parsing and validation,
# before the store: the cost of the HTTP stack and validation alone.
export BONYCHAT_CHANNEL_ID=another-channel
run "relay, validation only (wrong channelId: 400, nothing stored)" 64 "http://$RELAY_ADDR"
unset BONYCHAT_CHANNEL_ID
for c in 64 256; do run "relay, RELAY_SEND_WAIT_MS=0 (answer once stored)" "$c" "http://$RELAY_ADDR"; done
stop_relay
relay 3000
for c in 64 256; do run "relay, default (answer once JoinChat accepted)" "$c" "http://$RELAY_ADDR"; done
stop_relay

echo
echo "The store alone (SQLite, synchronous=FULL), concurrent writers enqueueing jobs:"
cargo build --release --locked --quiet --example bench_store
for writers in 1 64 256; do ./target/release/examples/bench_store "$writers" "$DURATION"; done
fi

# Postgres: one replica, then three sharing one database, each replica loaded by its own wrk
# (its own contacts) at a third of the connections; the figures are the sums and the worst p99.
# The cluster is a throwaway one with the durable defaults (fsync, synchronous_commit on).
echo
pg_dir=$(mktemp -d)
chmod 755 "$pg_dir" # the server runs as an unprivileged user
export RELAY_TEST_PG_DIR=$pg_dir/cluster RELAY_TEST_PG_PORT=54398 RELAY_TEST_PG_DURABLE=1
if ! scripts/test-postgres start >/dev/null; then
  echo "Postgres: skipped (scripts/test-postgres cannot start a cluster here)"
  exit 0
fi
trap 'cleanup; scripts/test-postgres stop >/dev/null; rm -rf "$pg_dir"' EXIT
pg_url=$(scripts/test-postgres url)
fresh_database() { # prints the URL of a new, empty database
  local name=bench_$RANDOM$RANDOM
  scripts/test-postgres psql -c "CREATE DATABASE $name" >/dev/null
  echo "${pg_url%/*}/$name"
}

# run_replicas LABEL CONNECTIONS ADDR...: one wrk per replica at once, summed.
run_replicas() {
  local label=$1 connections=$2; shift 2
  local outs=() loads=() i=0 addr
  for addr in "$@"; do
    outs+=("$data/wrk.$i")
    CONTACT_OFFSET=$((i * 1000000)) wrk -t1 -c$((connections / $#)) -d"${DURATION}s" --latency \
      -s bench/message.lua "http://$addr" >"$data/wrk.$i" 2>&1 &
    loads+=($!)
    i=$((i + 1))
  done
  wait "${loads[@]}" || true
  local rps=0 p99=0 errors=0 out
  for out in "${outs[@]}"; do
    rps=$((rps + $(awk '/^Requests\/sec/ {printf "%d", $2}' "$out")))
    errors=$((errors + $(awk '/Non-2xx/ {print $5} END {print 0}' "$out" | head -1)))
    p99=$(printf '%s\n%s\n' "$p99" "$(awk '$1 == "99%" {print $2}' "$out")" | sort -h | tail -1)
  done
  printf '| %s | %s | %s | %s | %s |\n' "$label" "$connections" "$rps" "$p99" "$errors"
}

echo "Postgres (one throwaway cluster on this machine, durable settings):"
echo
echo "| relays | connections | requests/s (sum) | worst p99 | non-200 |"
echo "|---|---|---|---|---|"
for wait_ms in 3000 0; do
  url=$(fresh_database)
  relay "$wait_ms" "$url" 127.0.0.1:18091 127.0.0.1:19091
  run_replicas "1 replica, RELAY_SEND_WAIT_MS=$wait_ms" 64 127.0.0.1:18091
  stop_relay
  url=$(fresh_database)
  relay "$wait_ms" "$url" 127.0.0.1:18091 127.0.0.1:19091
  relay "$wait_ms" "$url" 127.0.0.1:18092 127.0.0.1:19092
  relay "$wait_ms" "$url" 127.0.0.1:18093 127.0.0.1:19093
  run_replicas "3 replicas, RELAY_SEND_WAIT_MS=$wait_ms" 66 127.0.0.1:18091 127.0.0.1:18092 127.0.0.1:18093
  stop_relay; stop_relay; stop_relay
done
