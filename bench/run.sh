#!/usr/bin/env bash
# Throughput and latency of POST /message with the durable store, against a bare axum handler
# that answers 200 at once (the ceiling). Needs wrk (apt-get install wrk).
#
#   bash bench/run.sh            # 15 s per run
#   DURATION=30 bash bench/run.sh
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
relay() { # relay SEND_WAIT_MS: a fresh store each time
  rm -rf "$data"/relay.db*
  env -i PATH="$PATH" RUST_LOG=warn RELAY_ADDR=$RELAY_ADDR RELAY_METRICS_ADDR=127.0.0.1:19090 \
    BONYCHAT_CHANNEL_ID=bench-channel BONYCHAT_API_TOKEN=bench-token \
    BONYCHAT_WEBHOOK_URL=http://$JOINCHAT_ADDR/webhook \
    JOINCHAT_API_URL=http://$JOINCHAT_ADDR/api/send_message JOINCHAT_PAGE_ID=510249619162304 \
    JOINCHAT_API_SECRET=bench-secret MESSENGER_APP_SECRET=bench MESSENGER_VERIFY_TOKEN=bench \
    RELAY_DATABASE_URL="sqlite://$data/relay.db" RELAY_SEND_WAIT_MS="$1" \
    RELAY_MAX_QUEUED_OUTBOUND=100000000 \
    ./target/release/bonychat-relay &
  pids+=($!)
  wait_for $RELAY_ADDR
}

stop_relay() { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; unset 'pids[-1]'; }

./target/release/examples/bench_ceiling $CEILING_ADDR & pids+=($!)
./target/release/examples/bench_ceiling $JOINCHAT_ADDR & pids+=($!)
wait_for $CEILING_ADDR
wait_for $JOINCHAT_ADDR

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
