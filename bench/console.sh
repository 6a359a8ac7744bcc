#!/usr/bin/env bash
# How fast the operator console's pages answer with a million jobs stored (issue 19: "pages stay
# fast with a million jobs stored"). Builds a SQLite store of JOBS jobs (most delivered, DEAD dead
# letters with attempts, over CONTACTS contacts, two channels' worth of names), starts the release
# relay on it, signs in as a browser would, and times each page with curl (the median of RUNS).
#
#   bash bench/console.sh            # JOBS=1000000 DEAD=5000 CONTACTS=20000 RUNS=5
#
# Needs python3 (its sqlite3 module fills the store) and curl. The store lives in $WORK
# (default /var/tmp/bonychat-console-bench), on a real disk.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-1000000}
DEAD=${DEAD:-5000}
CONTACTS=${CONTACTS:-20000}
RUNS=${RUNS:-5}
WORK=${WORK:-/var/tmp/bonychat-console-bench}
PORT=${PORT:-18480}
TOKEN=bench-admin-token
BIN=${RELAY_BIN:-target/release/bonychat-relay}
[[ -x $BIN ]] || cargo build --release --locked

rm -rf "$WORK" && mkdir -p "$WORK"
export RELAY_ADDR=127.0.0.1:$PORT RELAY_METRICS_ADDR=127.0.0.1:0 RELAY_DATABASE_URL=sqlite://$WORK/relay.db \
    RELAY_ADMIN_TOKEN=$TOKEN RELAY_LOG_FORMAT=json RUST_LOG=warn \
    JOINCHAT_API_URL=http://127.0.0.1:$PORT/sandbox/joinchat/api/send_message \
    BONYCHAT_WEBHOOK_URL=http://127.0.0.1:$PORT/sandbox/bonychat/webhook
# The sandbox's configuration, its stand-ins unused: nothing below is queued.
"$BIN" --env-file config/sandbox.env check-config >/dev/null
"$BIN" --env-file config/sandbox.env >"$WORK/first.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
kill "$pid"; wait "$pid" || true

echo "filling $WORK/relay.db with $JOBS jobs ($DEAD dead) over $CONTACTS contacts"
python3 - "$WORK/relay.db" "$JOBS" "$DEAD" "$CONTACTS" <<'PY'
import random, sqlite3, sys
path, jobs, dead, contacts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
db = sqlite3.connect(path)
db.execute("PRAGMA journal_mode=WAL")
random.seed(7)
now = 1_796_000_000_000
payload = '{"v":1,"kind":"send","recipient":{"id":"%s"},"parts":[{"template_type":"text","text":"hello"}]}'
dead_ids = set(random.sample(range(1, jobs + 1), dead))
def rows():
    for i in range(1, jobs + 1):
        contact = str(1_000_000_000_000_000 + random.randrange(contacts))
        at = now - (jobs - i) * 50
        state = "dead" if i in dead_ids else "delivered"
        yield (i, "outbound", contact, "%032x" % random.getrandbits(128), payload % contact, state,
               4 if state == "dead" else 1, at, "gave up after 4 attempts: JoinChat answered 503" if state == "dead" else None,
               None if state == "dead" else at + 40, at, at + 40, "default" if i % 2 else "shoes")
db.executemany("INSERT INTO jobs (id, direction, contact, m_id, payload, state, attempts, next_attempt_at, last_error, "
               "accepted_at, created_at, updated_at, channel) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())
db.executemany("INSERT INTO attempts (job_id, attempt, at, outcome, status, error) VALUES (?,?,?,?,?,?)",
               ((job, n, now, "retry" if n < 4 else "dead", 503, "JoinChat answered 503") for job in dead_ids for n in range(1, 5)))
db.commit()
sample = db.execute("SELECT m_id, contact, id FROM jobs WHERE id = ?", (jobs // 3,)).fetchone()
open(path + ".sample", "w").write("%s %s %s\n" % sample)
PY
read -r M_ID CONTACT JOB <"$WORK/relay.db.sample"

"$BIN" --env-file config/sandbox.env >"$WORK/relay.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
base=http://127.0.0.1:$PORT
jar=$WORK/cookies
form=$(curl -s -c "$jar" -b "$jar" "$base/admin/sign-in")
csrf=$(sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' <<<"$form")
curl -s -o /dev/null -c "$jar" -b "$jar" --data-urlencode "token=$TOKEN" --data-urlencode "csrf=$csrf" "$base/admin/sign-in"

page() {
    local times=()
    for _ in $(seq "$RUNS"); do
        times+=("$(curl -s -o /dev/null -b "$jar" -w '%{http_code} %{time_total}' "$base$1")")
    done
    printf '%s\n' "${times[@]}" | sort -k2 -n | sed -n "$(((RUNS + 1) / 2))p" | {
        read -r code seconds
        printf '| `%s` | %s | %.1f ms |\n' "$1" "$code" "$(echo "$seconds * 1000" | bc -l)"
    }
}
before=$(curl -s -b "$jar" "$base/admin/dead-letters" | grep -o 'before=[0-9]*' | head -1)
echo
echo "| page ($JOBS jobs, $DEAD dead, median of $RUNS) | status | time |"
echo "|---|---|---|"
page /admin/
page /admin/dead-letters
page "/admin/dead-letters?$before"
page "/admin/dead-letters?channel=shoes"
page "/admin/search?q=$M_ID"
page "/admin/search?q=$CONTACT"
page "/admin/job/$JOB"
page "/admin/search?q=nobody-at-all"
