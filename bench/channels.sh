#!/usr/bin/env bash
# Channels (issue 16): a relay serving a file of many channels, and one channel's flood beside
# another's messages. Prints a Markdown report and writes it to
# bench/results/channels-<date>-<HHMM>.md (UTC).
#
#   bash bench/channels.sh                              # both sections: about 40 minutes on a quiet machine
#   SECTIONS=scale RUNS=9 CONTACT_ORDER=scattered bash bench/channels.sh
#   SECTIONS=flood STORES=sqlite bash bench/channels.sh
#   RELAY_BIN=/elsewhere/bonychat-relay bash bench/channels.sh   # another build, same runs
#   PORT_BASE=18381 PG_PORT=54359 bash bench/channels.sh        # beside another run of this script
#
# - scale (issue item 8: "a file of 1 000 channels starts in under a second and serves /message
#   within 5 % of one channel's throughput"), SQLite. A channels file of CHANNELS (1 000)
#   channels c0001…, one app; every secret in a file of its own (2 000 files), distinct tokens
#   and Page ids, every JoinChat URL and BonyChat webhook URL on one instant stand-in
#   (bench_ceiling, which checks no signature). Start: STARTS (10) starts of each, alternating,
#   each on a fresh store, from the fork to the first successful connect ("listening") and to
#   the first 200 of /readyz, polled without pause. Throughput: POST /message as in the
#   harness's message section (CONNECTIONS 64, DURATION 10 s, the default RELAY_SEND_WAIT_MS,
#   contacts spread over 100 000, JOINCHAT_ORDER_GAP_SECS 0, caps lifted) for (a) one channel
#   from the environment variables on /message, (b) the file, every request on channel c0001,
#   (c) the file, contact k's messages on channel k mod 1000 (bench/channels.lua); RUNS (3)
#   rounds, the order rotated each round, each run on a fresh store; medians, and the ratios
#   within each round. CONTACT_ORDER=scattered sends to contacts far apart in key order (as real
#   contact ids arrive) instead of bench/message.lua's ascending walk, which lets one channel's
#   contact-keyed indexes grow at one edge (bench/channels.lua says more).
# - flood (issue item 4: "one channel flooded with 100 000 queued messages and its JoinChat down,
#   another channel's messages still go out at once (p99 unchanged), both stores"). A file of two
#   channels: `flooded`, whose JoinChat answers 503 to every send (FLOOD_DOWN=refused: nothing
#   listens), and `calm`, whose JoinChat is bench_joinchat (counts what arrives, checks calm's
#   signature). RELAY_RETRY_JOINCHAT is FLOOD_RETRY (1s a thousand times: every queued head of
#   the flood is due again a second after each attempt, the most a flood can ask of the
#   dispatcher, and no job runs out of retries during the run). Each round, in alternating order:
#   "no flood" (a fresh store, the relay, calm measured) and "flood" (a fresh store; the relay
#   with RELAY_SEND_WAIT_MS=0 takes FLOOD messages for `flooded` over FLOOD_CONTACTS contacts
#   from wrk; then restarted with the default wait, its retries running for SETTLE s; calm
#   measured). Calm: CALM_CONNECTIONS (4) connections each pausing CALM_DELAY_MS (10) ms between
#   requests, CALM_DURATION (30) s: a modest steady rate. Both stores (STORES).
#
# The relay runs on CPU 0; wrk, the stand-ins, PostgreSQL (a durable throwaway cluster of
# scripts/test-postgres on PG_PORT, 54349) and this script on CPU 1. Stores under HARNESS_TMP
# (default /var/tmp: a real disk, not tmpfs).
#
# A shared machine: bench/foreign_cpu.py samples, every second, the CPU time of processes that
# are not this script's (another engineer's cargo build, tests, a database). Before each
# measured run the script waits (up to QUIET_MAX s) for QUIET_SECS quiet seconds (foreign use
# under QUIET_PCT % of one CPU, no compiler or test runner); a run during which the foreign use
# averaged QUIET_PCT or more, or a compiler or test runner ran, is run again (up to RERUNS times)
# and the report says so.
set -eEuo pipefail
trap 'echo "bench/channels.sh: line $LINENO: a command failed (exit $?): stopping" >&2' ERR
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
CHANNELS=${CHANNELS:-1000}
RUNS=${RUNS:-3}
STARTS=${STARTS:-10}
FLOOD=${FLOOD:-100000}
FLOOD_CONTACTS=${FLOOD_CONTACTS:-10000}
FLOOD_ROUNDS=${FLOOD_ROUNDS:-2}
FLOOD_DOWN=${FLOOD_DOWN:-503}
FLOOD_RETRY=${FLOOD_RETRY:-$(printf '1s,%.0s' $(seq 999))1s} # or `default`: the relay's own schedule
SETTLE=${SETTLE:-5}
CALM_CONNECTIONS=${CALM_CONNECTIONS:-4}
CALM_DELAY_MS=${CALM_DELAY_MS:-10}
CALM_DURATION=${CALM_DURATION:-30}
SECTIONS=${SECTIONS:-"scale flood"}
STORES=${STORES:-"sqlite postgres"}
QUIET_MAX=${QUIET_MAX:-900}
QUIET_SECS=${QUIET_SECS:-3}
QUIET_PCT=${QUIET_PCT:-15}
RERUNS=${RERUNS:-2}
# Another build of the relay to measure with the same script (an earlier release, say).
RELAY_BIN=${RELAY_BIN:-./target/release/bonychat-relay}

# Ports: PORT_BASE … PORT_BASE + 4, PORT_BASE + 1002 and PG_PORT. Two runs of this script at once
# (two worktrees, say) need different ones; a port already taken stops the run at once.
PORT_BASE=${PORT_BASE:-18281}
STANDIN=127.0.0.1:$PORT_BASE            # bench_ceiling: instant JoinChat and BonyChat (CPU 1)
DOWN=127.0.0.1:$((PORT_BASE + 1))       # flooded's JoinChat: bench_ceiling answering 503, or nothing
RELAY=127.0.0.1:$((PORT_BASE + 2))
CALM_JC=127.0.0.1:$((PORT_BASE + 4))    # bench_joinchat: calm's JoinChat (CPU 1)
METRICS=127.0.0.1:$((PORT_BASE + 1002))
PG_PORT=${PG_PORT:-54349}

for tool in taskset wrk curl python3; do
  command -v $tool >/dev/null || { echo "$tool is missing (apt-get install wrk util-linux curl python3)" >&2; exit 1; }
done
[[ $(nproc --all) -ge 2 ]] || { echo "needs two CPUs (0 for the relay, 1 for the rest)" >&2; exit 1; }
for addr in $STANDIN $DOWN $RELAY $CALM_JC $METRICS 127.0.0.1:$PG_PORT; do
  if { : >&3; } 2>/dev/null 3<>"/dev/tcp/${addr%:*}/${addr#*:}"; then
    echo "$addr is taken (another run of this script?): set PORT_BASE and PG_PORT to free ports" >&2
    exit 1
  fi
done
echo "building (release)…" >&2
cargo build --release --locked --quiet --bin bonychat-relay --example bench_ceiling --example bench_joinchat
taskset -cp 1 $$ >/dev/null

data=$(mktemp -d -p "${HARNESS_TMP:-/var/tmp}" relay-channels.XXXXXX)
[[ $(stat -f -c %T "$data") != tmpfs ]] || { echo "$data is on tmpfs: set HARNESS_TMP" >&2; exit 1; }
chmod 755 "$data" # PostgreSQL's cluster lives in it, run by its own user
logs=${LOG_DIR:-$data}
mkdir -p "$logs" bench/results "$data/secrets"
report=${REPORT:-bench/results/channels-$(date -u +%Y-%m-%d-%H%M).md}
: >"$report"
export RELAY_TEST_PG_DIR=$data/pg RELAY_TEST_PG_PORT=$PG_PORT RELAY_TEST_PG_DURABLE=1

pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ " $SECTIONS " == *" flood "* && " $STORES " == *" postgres "* ]] && scripts/test-postgres stop >/dev/null 2>&1
  rm -rf "$data"
}
trap cleanup EXIT
trap 'echo "bench/channels.sh: stopped by a signal" >&2; exit 130' INT TERM HUP

# shellcheck source=bench/common.sh
. bench/common.sh

# ---------------------------------------------------------------------------------------------
# The machine: what else runs.
monitor=$data/foreign.log
: >"$monitor"
python3 bench/foreign_cpu.py 1 "$monitor" $$ "$data/pg/data/postmaster.pid" &
pids+=($!)

# wait_quiet: until QUIET_SECS samples in a row show the machine quiet, up to QUIET_MAX s.
wait_quiet() {
  local waited=0 quiet
  while :; do
    quiet=$(tail -n "$QUIET_SECS" "$monitor" 2>/dev/null | awk -v p="$QUIET_PCT" '$2 < p && $3 == "-" {n++} END {print n + 0}')
    ((quiet >= QUIET_SECS)) && break
    if ((waited >= QUIET_MAX)); then
      note "the machine is still busy after ${QUIET_MAX} s ($(tail -1 "$monitor")); measuring all the same"
      break
    fi
    ((waited % 30 == 0)) && note "waiting for a quiet machine: $(tail -1 "$monitor" | cut -d' ' -f2-)"
    sleep 1
    waited=$((waited + 1))
  done
  QUIET_WAITED=$waited
}

mark() { MARK=$(wc -l <"$monitor"); } # the monitor's line at the start of a run

# disturbance: the foreign CPU since the mark: sets FOREIGN ("12 %" mean, and the compilers
# seen) and DISTURBED (1 when the run should be measured again).
disturbance() {
  local summary
  summary=$(tail -n +"$((MARK + 1))" "$monitor" | awk -v p="$QUIET_PCT" '
    {n++; s += $2; if ($2 > m) m = $2; if ($3 != "-") {split($3, c, ","); for (i in c) seen[c[i]] = 1}}
    END {
      names = ""; for (k in seen) names = names (names == "" ? "" : ",") k
      mean = n ? s / n : 0
      printf "%d %.0f %.0f %s\n", (mean >= p || names != "") ? 1 : 0, mean, m, names == "" ? "-" : names
    }')
  read -r DISTURBED mean max names <<<"$summary"
  FOREIGN="${mean} % (max ${max} %)"
  [[ $names == - ]] || FOREIGN="$FOREIGN, $names"
}

# measured FUNCTION ARGS…: runs FUNCTION on a quiet machine, again (up to RERUNS times) when it
# was disturbed; sets NOTE for the report (reruns, waits).
measured() {
  local tries=0
  NOTE=
  while :; do
    wait_quiet
    mark
    "$@"
    disturbance
    ((DISTURBED == 0)) && break
    if ((tries >= RERUNS)); then
      NOTE="${NOTE}disturbed (foreign CPU $FOREIGN), kept after $tries rerun(s); "
      break
    fi
    tries=$((tries + 1))
    NOTE="${NOTE}rerun: a first try saw foreign CPU $FOREIGN; "
    note "disturbed ($FOREIGN): running again"
  done
  ((QUIET_WAITED > 0)) && NOTE="${NOTE}waited ${QUIET_WAITED} s for a quiet machine; "
  NOTE=${NOTE%; }
  return 0
}

# ---------------------------------------------------------------------------------------------
# Stores, stand-ins and the relay.
database_url() { # STORE
  case $1 in
    sqlite) echo "sqlite://$data/relay.db" ;;
    postgres) echo "postgres://relay@127.0.0.1:$PG_PORT/channels" ;;
  esac
}

fresh_store() { # STORE
  case $1 in
    sqlite) rm -f "$data"/relay.db* ;;
    postgres)
      scripts/test-postgres psql -q -c "DROP DATABASE IF EXISTS channels" -c "CREATE DATABASE channels" >/dev/null
      ;;
  esac
}

sql() { # STORE SQL: run on the store (the relay may be running: SQLite readers share the file)
  case $1 in
    sqlite) python3 -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=30); r = c.execute(sys.argv[2]).fetchall(); c.commit(); print("\n".join(" ".join(str(v) for v in row) for row in r))' "$data/relay.db" "$2" ;;
    postgres) PGOPTIONS="-c statement_timeout=0" psql -Atq -F' ' "$(database_url postgres)" -c "$2" ;;
  esac
}

start_on_cpu1() { # ADDR COMMAND…: a stand-in on CPU 1; sets LAST_PID
  local addr=$1; shift
  "$@" >>"$logs/standins.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
  wait_for "$addr"
}

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

# The variables every relay here gets. JoinChat pacing is off (order gap 0) and the intake caps
# lifted, as in the harness, so neither caps the load.
common_env() { # STORE
  echo PATH="$PATH" RUST_LOG=warn RELAY_ADDR=$RELAY RELAY_METRICS_ADDR=$METRICS RELAY_SHUTDOWN_GRACE_SECS=1 \
    RELAY_DATABASE_URL="$(database_url "$1")" RELAY_DATABASE_POOL_SIZE=16 \
    RELAY_MAX_QUEUED_OUTBOUND=100000000 RELAY_MAX_QUEUED_INBOUND=100000000 RELAY_MAX_QUEUED_PER_CONTACT=100000000
}
single_env() { # the channel `default` from the variables of SPEC §1, as bench/harness.sh has it
  echo BONYCHAT_CHANNEL_ID=bench-channel BONYCHAT_API_TOKEN=bench-token BONYCHAT_WEBHOOK_URL=http://$STANDIN/message \
    JOINCHAT_API_URL=http://$STANDIN/api/send_message JOINCHAT_PAGE_ID=510249619162304 \
    JOINCHAT_API_SECRET=bench-secret MESSENGER_APP_SECRET=bench-app-secret MESSENGER_VERIFY_TOKEN=bench \
    JOINCHAT_ORDER_GAP_SECS=0 JOINCHAT_MAX_SENDS_PER_SEC=100000
}
file_env() { # FILE
  echo RELAY_CHANNELS_FILE="$1" BENCH_APP_SECRET=bench-app-secret BENCH_VERIFY_TOKEN=bench
}

# channel_table NAME PAGE_ID JOINCHAT_URL: a [channels.NAME] table whose secrets are files, as
# bench/channels.lua expects them (token bench-token-NAME, Channel ID bench-channel-NAME).
channel_table() {
  printf 'bench-token-%s\n' "$1" >"$data/secrets/$1-token"
  printf 'bench-secret-%s\n' "$1" >"$data/secrets/$1-joinchat"
  cat <<EOF

[channels.$1]
bonychat_channel_id = "bench-channel-$1"
bonychat_api_token_file = "$data/secrets/$1-token"
bonychat_webhook_url = "http://$STANDIN/message"
joinchat_page_id = "$2"
joinchat_api_secret_file = "$data/secrets/$1-joinchat"
joinchat_api_url = "$3"
joinchat_order_gap_secs = 0
joinchat_max_sends_per_sec = 100000
messenger_app = "bench"
EOF
}
app_table() {
  printf '[apps.bench]\napp_secret_env = "BENCH_APP_SECRET"\nverify_token_env = "BENCH_VERIFY_TOKEN"\n'
}

kb_of() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; } # PID VmRSS|VmHWM
mb() { awk -v kb="$1" 'BEGIN {printf "%.1f MB", kb / 1024}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # PID: user + system time, in 1/100 s
written_bytes() { awk '$1 == "write_bytes:" {print $2}' "/proc/$1/io"; } # PID: bytes it sent to the disk
elapsed_ms() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN {printf "%.1f", (b - a) * 1000}'; }

# start_relay STORE VAR=VALUE…: the relay on CPU 0 with these variables (besides common_env);
# sets RELAY_PID, LISTEN_MS (from the fork to the first connection the port accepts) and
# READY_MS (to the first 200 of /readyz), polled without a pause over /dev/tcp.
start_relay() {
  local store=$1; shift
  local port=${RELAY#*:} line t0
  LISTEN_MS=
  t0=$EPOCHREALTIME
  # shellcheck disable=SC2046
  env -i $(common_env "$store") "$@" taskset -c 0 "$RELAY_BIN" >>"$logs/relay.log" 2>&1 &
  RELAY_PID=$!
  pids+=("$RELAY_PID")
  while :; do
    line=
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
      [[ -n $LISTEN_MS ]] || LISTEN_MS=$(elapsed_ms "$t0")
      { printf 'GET /readyz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n' >&3; IFS= read -r -t 2 line <&3; } 2>/dev/null || true
      exec 3<&-
    fi
    [[ $line == "HTTP/1.1 200"* ]] && kill -0 "$RELAY_PID" 2>/dev/null && break
    if ! kill -0 "$RELAY_PID" 2>/dev/null; then
      echo "the relay stopped; its log:" >&2
      tail -20 "$logs/relay.log" >&2
      exit 1
    fi
    if (($(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {print (b - a > 60)}'))); then
      echo "the relay is not ready after 60 s" >&2
      exit 1
    fi
  done
  READY_MS=$(elapsed_ms "$t0")
}

stop_relay() { stop "$RELAY_PID"; }

# load CONNECTIONS DURATION [VAR=VALUE…]: one wrk run of bench/channels.lua against the relay,
# the variables for the script; sets RPS P50 P99 P999 MAX NON200 ACCEPTED, CPU_US (the relay's
# CPU time per request answered), CPU_PCT (the relay's CPU use over the run, % of one CPU) and
# WRITE_KB (what the relay had written to the disk per request: write_bytes of /proc/<pid>/io).
load() {
  local c=$1 seconds=$2; shift 2
  local threads=$((c < 2 ? 1 : 2)) out line ticks t0
  local written
  ticks=$(cpu_ticks "$RELAY_PID")
  written=$(written_bytes "$RELAY_PID")
  t0=$EPOCHREALTIME
  out=$(env -u CHANNELS -u CHANNEL -u CONTACTS -u CONTACT_OFFSET -u DELAY_MS "$@" wrk -t"$threads" -c"$c" -d"${seconds}s" --timeout 10s -s bench/channels.lua "http://$RELAY" 2>&1) || {
    echo "$out" >&2
    exit 1
  }
  ticks=$(($(cpu_ticks "$RELAY_PID") - ticks))
  written=$(($(written_bytes "$RELAY_PID") - written))
  line=$(grep '^HARNESS ' <<<"$out") || { echo "$out" >&2; exit 1; }
  RPS=$(awk '{print int($3 * 1000000 / $5)}' <<<"$line")
  CPU_US=$(awk -v t="$ticks" '{printf "%.0f µs", t * 10000 / ($3 ? $3 : 1)}' <<<"$line")
  WRITE_KB=$(awk -v w="$written" '{printf "%.2f kB", w / 1024 / ($3 ? $3 : 1)}' <<<"$line")
  CPU_PCT=$(awk -v t="$ticks" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.0f %%", t / (b - a)}')
  P50=$(ms "$(stat_of "$line" p50_us)")
  P99=$(ms "$(stat_of "$line" p99_us)")
  P99_US=$(stat_of "$line" p99_us)
  P999=$(ms "$(stat_of "$line" p999_us)")
  MAX=$(ms "$(stat_of "$line" max_us)")
  NON200=$(($(stat_of "$line" non2xx) + $(stat_of "$line" socket_errors)))
  ACCEPTED=$(stat_of "$line" accepted)
  grep '^unexpected' <<<"$out" | head -3 >&2 || true
}

# metric NAME LABEL-MATCHES…: the sum of the samples of NAME whose labels contain every match
metric() {
  local name=$1; shift
  curl -sf "http://$METRICS/metrics" | awk -v name="$name" -v matches="$*" '
    index($0, name) == 1 && (substr($0, length(name) + 1, 1) == "{" || substr($0, length(name) + 1, 1) == " ") {
      n = split(matches, m, " "); ok = 1
      for (i = 1; i <= n; i++) if (index($0, m[i]) == 0) ok = 0
      if (ok) s += $NF
    }
    END {printf "%.6f\n", s}'
}
fsync_ms() { # a 4 KiB write with oflag=dsync in the store's directory, mean of 100, in ms
  dd if=/dev/zero of="$data/dd" bs=4k count=100 oflag=dsync 2>&1 |
    awk '/copied/ {for (i = 1; i < NF; i++) if ($(i + 1) == "s,") printf "%.2f", $i * 1000 / 100}'
  rm -f "$data/dd"
}

median() { sort -g | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]; else print "?"}'; }

commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- src examples bench Cargo.toml Cargo.lock migrations || commit="$commit + uncommitted changes"
[[ $RELAY_BIN == ./target/release/bonychat-relay ]] || commit="relay $RELAY_BIN ($("$RELAY_BIN" --version 2>/dev/null || echo 'version unknown')), script of $commit"
say "# Channels: scale and isolation, $(date -u '+%Y-%m-%d %H:%M UTC')"
say
say "Commit $commit; $(nproc --all) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)); release build;"
say "relay on CPU 0; wrk, the stand-ins, PostgreSQL and the script on CPU 1; stores in $(dirname "$data") ($(stat -f -c %T "$data")); \`bash bench/channels.sh\`."
say "Before the run: load average $(cut -d' ' -f1-3 /proc/loadavg). Foreign CPU: what processes other than this"
say "script's used during a run (\`bench/foreign_cpu.py\`, % of one CPU, mean and largest 1 s sample); runs are"
say "started on a quiet machine (under $QUIET_PCT % for $QUIET_SECS s, no compiler) and run again when disturbed."
say

# ---------------------------------------------------------------------------------------------
if [[ " $SECTIONS " == *" scale "* ]]; then
start_on_cpu1 $STANDIN ./target/release/examples/bench_ceiling $STANDIN
standin_pid=$LAST_PID

note "scale: writing a file of $CHANNELS channels"
many=$data/channels-$CHANNELS.toml
{
  app_table
  for i in $(seq "$CHANNELS"); do
    channel_table "$(printf 'c%04d' "$i")" $((510249619000000 + i)) "http://$STANDIN/api/send_message"
  done
} >"$many"

say "## Scale: $CHANNELS channels (SQLite)"
say
say "A channels file of $CHANNELS channels (\`c0001\` …; one app; $((CHANNELS * 2)) secret files: each channel's token"
say "and JoinChat secret, all distinct; distinct Page ids; $(wc -c <"$many") bytes), against the channel \`default\` of the"
say "environment variables. Every JoinChat URL and webhook URL is the instant stand-in (\`bench_ceiling\`, 200 at once)."
say
say "### Start"
say
say "$STARTS starts of each, alternating, each on a fresh store: from the fork of the relay (through \`env\` and"
say "\`taskset\`) to the first connection its port accepts (listening) and to the first 200 of \`/readyz\`."
say
declare -A listen_of ready_of idle_of
one_start() { # env|file
  fresh_store sqlite
  if [[ $1 == env ]]; then
    # shellcheck disable=SC2046
    start_relay sqlite $(single_env)
  else
    # shellcheck disable=SC2046
    start_relay sqlite $(file_env "$many")
  fi
  sleep 1
  IDLE_KB=$(kb_of "$RELAY_PID" VmRSS)
  stop_relay
}
for i in $(seq "$STARTS"); do
  for variant in env file; do
    note "start $i of $STARTS: $variant"
    measured one_start $variant
    flag=
    ((DISTURBED)) && flag="*"
    listen_of[$variant]+="$LISTEN_MS$flag "
    ready_of[$variant]+="$READY_MS$flag "
    idle_of[$variant]+="$IDLE_KB "
  done
done
say "| configuration | starts | to listening: median; max | to \`/readyz\` 200: median; max | resident 1 s after ready (median) | every start to ready (ms; * = disturbed) |"
say "|---|---|---|---|---|---|"
for variant in env file; do
  label="1 channel (environment variables)"
  [[ $variant == file ]] && label="$CHANNELS channels (file)"
  l=$(tr ' ' '\n' <<<"${listen_of[$variant]}" | tr -d '*' | grep . | median)
  lmax=$(tr ' ' '\n' <<<"${listen_of[$variant]}" | tr -d '*' | grep . | sort -g | tail -1)
  r=$(tr ' ' '\n' <<<"${ready_of[$variant]}" | tr -d '*' | grep . | median)
  rmax=$(tr ' ' '\n' <<<"${ready_of[$variant]}" | tr -d '*' | grep . | sort -g | tail -1)
  idle=$(tr ' ' '\n' <<<"${idle_of[$variant]}" | grep . | median)
  say "| $label | $STARTS | $l ms; $lmax ms | $r ms; $rmax ms | $(mb "$idle") | ${ready_of[$variant]% } |"
  [[ $variant == file ]] && { start_median=$r; start_max=$rmax; }
  [[ $variant == env ]] && { start_env_median=$r; }
done
say

say "### Throughput of \`POST /message\`"
say
say "wrk \`-t2 -c$CONNECTIONS\` for $DURATION s (\`bench/channels.lua\`), the default \`RELAY_SEND_WAIT_MS=3000\` (answered once"
say "JoinChat took the message), contacts spread over 100 000 in ${CONTACT_ORDER:-sequential} order (\`CONTACT_ORDER\`, see \`bench/channels.lua\`); each run on a fresh store. $RUNS rounds, the order of"
say "the variants rotated each round. Relay CPU per request: its user and system time over the run ÷ requests answered."
say "Delivered > 1 s after stored: from the relay's \`bonychat_relay_delivery_latency_seconds\` 2 s after the load, the"
say "messages that were not sent while their request waited (the request answered 200 before JoinChat took them)."
say "fsync: a 4 KiB write with \`oflag=dsync\` in the store's directory just before the run (mean of 100)."
say "Disk writes per request: the relay's \`write_bytes\` (\`/proc/<pid>/io\`) over the run ÷ requests answered."
say
say "| round | variant | requests/s | p50 | p99 | p99.9 | non-200 | delivered > 1 s after stored | relay CPU per request | relay CPU | disk writes per request | fsync | foreign CPU | note |"
say "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
variants=(a b c)
declare -A label_of=(
  [a]="(a) 1 channel, environment variables, \`/message\`"
  [b]="(b) $CHANNELS-channel file, all on \`c0001\`"
  [c]="(c) $CHANNELS-channel file, spread over all"
)
declare -A rps_runs p50_runs p99_runs cpu_runs rps_round write_runs
run_variant() { # a|b|c
  fresh_store sqlite
  FSYNC=$(fsync_ms)
  case $1 in
    # shellcheck disable=SC2046
    a) start_relay sqlite $(single_env); load "$CONNECTIONS" "$DURATION" ;;
    # shellcheck disable=SC2046
    b) start_relay sqlite $(file_env "$many"); load "$CONNECTIONS" "$DURATION" CHANNEL=c0001 ;;
    # shellcheck disable=SC2046
    c) start_relay sqlite $(file_env "$many"); load "$CONNECTIONS" "$DURATION" CHANNELS="$CHANNELS" ;;
  esac
  sleep 2
  local all in_1s
  all=$(metric bonychat_relay_delivery_latency_seconds_count 'direction="outbound"')
  in_1s=$(metric bonychat_relay_delivery_latency_seconds_bucket 'direction="outbound"' 'le="1"')
  LATE=$(awk -v a="$all" -v b="$in_1s" 'BEGIN {printf "%d (%.1f %%)", a - b, (a > 0 ? (a - b) * 100 / a : 0)}')
  stop_relay
}
for round in $(seq "$RUNS"); do
  for k in 0 1 2; do
    v=${variants[$(((round - 1 + k) % 3))]}
    note "throughput round $round: ${label_of[$v]}"
    measured run_variant "$v"
    say "| $round | ${label_of[$v]} | $RPS | $P50 | $P99 | $P999 | $NON200 | $LATE | $CPU_US | $CPU_PCT | $WRITE_KB | $FSYNC ms | $FOREIGN | $NOTE |"
    rps_runs[$v]+="$RPS "
    rps_round[$round.$v]=$RPS
    p50_runs[$v]+="${P50% ms} "
    p99_runs[$v]+="${P99% ms} "
    cpu_runs[$v]+="${CPU_US% µs} "
    write_runs[$v]+="${WRITE_KB% kB} "
  done
done
say
say "Medians of the $RUNS runs:"
say
say "| variant | requests/s | ratio to (a) | p50 | p99 | relay CPU per request | ratio to (a) | disk writes per request |"
say "|---|---|---|---|---|---|---|---|"
declare -A rps_median cpu_median
for v in "${variants[@]}"; do
  rps_median[$v]=$(tr ' ' '\n' <<<"${rps_runs[$v]}" | grep . | median)
  cpu_median[$v]=$(tr ' ' '\n' <<<"${cpu_runs[$v]}" | grep . | median)
done
for v in "${variants[@]}"; do
  say "| ${label_of[$v]} | ${rps_median[$v]} | $(awk -v x="${rps_median[$v]}" -v y="${rps_median[a]}" 'BEGIN {printf "%.3f", x / y}') | \
$(tr ' ' '\n' <<<"${p50_runs[$v]}" | grep . | median) ms | $(tr ' ' '\n' <<<"${p99_runs[$v]}" | grep . | median) ms | \
${cpu_median[$v]} µs | $(awk -v x="${cpu_median[$v]}" -v y="${cpu_median[a]}" 'BEGIN {printf "%.3f", x / y}') | \
$(tr ' ' '\n' <<<"${write_runs[$v]}" | grep . | median) kB |"
done
say
verdict() { if (($(awk "BEGIN {print ($1) ? 1 : 0}"))); then echo met; else echo "not met"; fi; }
ratio_b=$(awk -v x="${rps_median[b]}" -v y="${rps_median[a]}" 'BEGIN {printf "%.3f", x / y}')
ratio_c=$(awk -v x="${rps_median[c]}" -v y="${rps_median[a]}" 'BEGIN {printf "%.3f", x / y}')
# The same ratios within each round (the runs of a round are minutes apart, the rounds further):
# their median and range say how much of a difference the machine's drift leaves measurable.
for v in b c; do
  ratios=$(for round in $(seq "$RUNS"); do awk -v x="${rps_round[$round.$v]}" -v y="${rps_round[$round.a]}" 'BEGIN {printf "%.3f\n", x / y}'; done)
  say "($v) ÷ (a) within each round: $(paste -sd' ' <<<"$ratios"); median $(median <<<"$ratios")."
done
say
say "| issue 16, item 8 | measured | target | |"
say "|---|---|---|---|"
say "| start of the $CHANNELS-channel file to \`/readyz\` 200 (median; max) | $start_median ms; $start_max ms (1 channel: $start_env_median ms) | < 1 s | $(verdict "$start_max < 1000") |"
say "| (b) ÷ (a), requests/s | $ratio_b | ≥ 0.95 | $(verdict "$ratio_b >= 0.95") |"
say "| (c) ÷ (a), requests/s | $ratio_c | ≥ 0.95 | $(verdict "$ratio_c >= 0.95") |"
say
stop "$standin_pid"
fi

# ---------------------------------------------------------------------------------------------
if [[ " $SECTIONS " == *" flood "* ]]; then
if [[ " $STORES " == *" postgres "* ]]; then
  note "PostgreSQL (durable) on port $PG_PORT"
  taskset -c 1 scripts/test-postgres start >/dev/null
fi
start_on_cpu1 $STANDIN ./target/release/examples/bench_ceiling $STANDIN
if [[ $FLOOD_DOWN == refused ]]; then
  down_label="nothing listens on its port (connection refused)"
else
  start_on_cpu1 $DOWN ./target/release/examples/bench_ceiling $DOWN "$FLOOD_DOWN"
  down_label="a stand-in answers $FLOOD_DOWN to every send"
fi
start_on_cpu1 $CALM_JC env JOINCHAT_API_SECRET=bench-secret-calm ./target/release/examples/bench_joinchat $CALM_JC

two=$data/channels-flood.toml
{
  app_table
  channel_table flooded 510249619100001 "http://$DOWN/api/send_message"
  channel_table calm 510249619100002 "http://$CALM_JC/api/send_message"
} >"$two"

standin_count() { curl -sf "http://$CALM_JC/stats" | awk '{print $2}'; } # delivered so far

# calm_run: measure calm on the running relay; sets the load's figures and DELIVERED (what
# calm's stand-in received during and up to 10 s after the run), ATTEMPTS_PER_S (flooded's
# attempts a second), COMMIT_MEAN_MS, CALM_LATENCY (calm's delivery latency, mean).
calm_run() {
  local before att0 att1 cs0 cc0 cs1 cc1 ls0 lc0 ls1 lc1 t0 t1
  before=$(standin_count)
  att0=$(metric bonychat_relay_delivery_attempts_total 'channel="flooded"')
  cs0=$(metric bonychat_relay_store_commit_duration_seconds_sum); cc0=$(metric bonychat_relay_store_commit_duration_seconds_count)
  ls0=$(metric bonychat_relay_delivery_latency_seconds_sum 'channel="calm"'); lc0=$(metric bonychat_relay_delivery_latency_seconds_count 'channel="calm"')
  t0=$EPOCHREALTIME
  load "$CALM_CONNECTIONS" "$CALM_DURATION" CHANNEL=calm DELAY_MS="$CALM_DELAY_MS" CONTACTS=10000
  t1=$EPOCHREALTIME
  att1=$(metric bonychat_relay_delivery_attempts_total 'channel="flooded"')
  cs1=$(metric bonychat_relay_store_commit_duration_seconds_sum); cc1=$(metric bonychat_relay_store_commit_duration_seconds_count)
  ls1=$(metric bonychat_relay_delivery_latency_seconds_sum 'channel="calm"'); lc1=$(metric bonychat_relay_delivery_latency_seconds_count 'channel="calm"')
  local i
  for i in $(seq 100); do
    DELIVERED=$(($(standin_count) - before))
    ((DELIVERED >= ACCEPTED)) && break
    sleep 0.1
  done
  ATTEMPTS_PER_S=$(awk -v a="$att0" -v b="$att1" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.0f", (b - a) / (t1 - t0)}')
  COMMIT_MEAN_MS=$(awk -v s0="$cs0" -v s1="$cs1" -v c0="$cc0" -v c1="$cc1" -v t0="$t0" -v t1="$t1" \
    'BEGIN {if (c1 > c0) printf "%.2f ms, %.0f/s", (s1 - s0) * 1000 / (c1 - c0), (c1 - c0) / (t1 - t0); else printf "(SQLite only)"}')
  CALM_LATENCY=$(awk -v s0="$ls0" -v s1="$ls1" -v c0="$lc0" -v c1="$lc1" 'BEGIN {printf "%.1f ms", (c1 > c0 ? (s1 - s0) * 1000 / (c1 - c0) : 0)}')
}

# no_flood STORE / with_flood STORE: one measurement of calm, without and with the flood.
no_flood() {
  fresh_store "$1"
  # shellcheck disable=SC2046
  start_relay "$1" $(file_env "$two") $retry_var
  sleep "$SETTLE"
  QUEUED=$(sql "$1" "SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
  calm_run
  stop_relay
}
fill_flood() { # STORE: FLOOD messages for `flooded`, taken by a relay answering once stored
  fresh_store "$1"
  # shellcheck disable=SC2046
  start_relay "$1" $(file_env "$two") $retry_var RELAY_SEND_WAIT_MS=0
  local t0=$EPOCHREALTIME filler n
  env -u CHANNELS CHANNEL=flooded CONTACTS="$FLOOD_CONTACTS" CONTACT_OFFSET=500000 \
    wrk -t2 -c64 -d3600s --timeout 10s -s bench/channels.lua "http://$RELAY" >/dev/null 2>&1 &
  filler=$!
  while :; do
    n=$(sql "$1" "SELECT COUNT(*) FROM jobs WHERE channel = 'flooded' AND direction = 'outbound' AND state = 'queued'")
    ((n >= FLOOD)) && break
    sleep 0.25
  done
  kill $filler
  wait $filler 2>/dev/null || true
  FILL=$(awk -v n="$n" -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%d in %.0f s (%.0f/s)", n, b - a, n / (b - a)}')
  FILL="$FILL; queued jobs by channel and direction: $(sql "$1" "SELECT channel || ' ' || direction || ' ' || COUNT(*) FROM jobs WHERE state = 'queued' GROUP BY channel, direction" | paste -sd, | sed 's/,/, /g')"
  stop_relay
}
with_flood() {
  # shellcheck disable=SC2046
  start_relay "$1" $(file_env "$two") $retry_var
  FLOOD_READY_MS=$READY_MS
  sleep "$SETTLE"
  calm_run
  QUEUED=$(sql "$1" "SELECT COUNT(*) FROM jobs WHERE channel = 'flooded' AND state = 'queued'")
  stop_relay
}

say "## Flood: one channel's JoinChat down with $FLOOD messages queued, another channel beside it"
say
say "Two channels in one file: \`flooded\` ($down_label) and \`calm\` (\`bench_joinchat\`: 200 at once, counts what"
if [[ $FLOOD_RETRY == default ]]; then
  retry_var=
  schedule="the relay's default \`RELAY_RETRY_JOINCHAT\` (1s, 5s, 30s, 2m, …): the flood's heads come due less and less often"
else
  retry_var="RELAY_RETRY_JOINCHAT=$FLOOD_RETRY"
  schedule="\`RELAY_RETRY_JOINCHAT\` = $(tr ',' '\n' <<<"$FLOOD_RETRY" | sort | uniq -c | awk '{printf "%s%s × %s", (NR > 1 ? ", " : ""), $1, $2}'): each queued head of the flood is due again about a second after each attempt"
fi
say "arrives, checks calm's signature); $schedule."
say "Flood: $FLOOD messages for \`flooded\`"
say "over $FLOOD_CONTACTS contacts, sent through \`/message\` to a relay answering once stored (\`RELAY_SEND_WAIT_MS=0\`,"
say "its retries already running); then the relay restarted with the default wait and left $SETTLE s to its retries."
say "No flood: the same relay on a fresh store. Calm: \`bench/channels.lua\` with $CALM_CONNECTIONS connections, each pausing"
say "$CALM_DELAY_MS ms between requests, $CALM_DURATION s, the default \`RELAY_SEND_WAIT_MS\` (a 200 once JoinChat took the message)."
say "Flooded's attempts a second, the store's commits and calm's delivery latency are read from \`/metrics\`"
say "before and after the calm run."
say
say "| store | round | flood | flooded queued | calm requests/s | p50 | p99 | p99.9 | max | non-200 | arrived at calm's JoinChat / accepted | calm delivery latency (mean) | flooded attempts/s | store commits (mean, rate) | relay CPU | foreign CPU | note |"
say "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
declare -A flood_p99 flood_p50 flood_max
fills=()
for store in $STORES; do
  for round in $(seq "$FLOOD_ROUNDS"); do
    order="none flood"
    ((round % 2 == 0)) && order="flood none"
    for phase in $order; do
      note "flood: $store, round $round, $phase"
      if [[ $phase == none ]]; then
        measured no_flood "$store"
        extra="$QUEUED"
      else
        fill_flood "$store"
        measured with_flood "$store"
        fills+=("$store: $FILL; the relay then started on it in $FLOOD_READY_MS ms")
        extra="$QUEUED"
      fi
      say "| $store | $round | $phase | $extra | $RPS | $P50 | $P99 | $P999 | $MAX | $NON200 | $DELIVERED / $ACCEPTED | $CALM_LATENCY | $ATTEMPTS_PER_S | $COMMIT_MEAN_MS | $CPU_PCT | $FOREIGN | $NOTE |"
      flood_p99[$store.$phase]+="${P99% ms} "
      flood_p50[$store.$phase]+="${P50% ms} "
      flood_max[$store.$phase]+="${MAX% ms} "
    done
  done
done
say
say "Fills (\`/message\` with \`RELAY_SEND_WAIT_MS=0\`, 64 connections, until $FLOOD were queued for \`flooded\`):"
say
for f in "${fills[@]}"; do say "- $f"; done
say
say "| store | calm p50, no flood → flood (medians) | calm p99, no flood → flood (medians) | ratio of p99 | largest max, no flood → flood |"
say "|---|---|---|---|---|"
for store in $STORES; do
  a=$(tr ' ' '\n' <<<"${flood_p99[$store.none]}" | grep . | median)
  b=$(tr ' ' '\n' <<<"${flood_p99[$store.flood]}" | grep . | median)
  say "| $store | $(tr ' ' '\n' <<<"${flood_p50[$store.none]}" | grep . | median) → $(tr ' ' '\n' <<<"${flood_p50[$store.flood]}" | grep . | median) ms | \
$a → $b ms | $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b / a}') | \
$(tr ' ' '\n' <<<"${flood_max[$store.none]}" | grep . | sort -g | tail -1) → $(tr ' ' '\n' <<<"${flood_max[$store.flood]}" | grep . | sort -g | tail -1) ms |"
done
say
fi

say "After the run: load average $(cut -d' ' -f1-3 /proc/loadavg)."
echo "written to $report" >&2
