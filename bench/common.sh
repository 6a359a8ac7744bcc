# Shared by the benchmark scripts (sourced, not run): the report, waiting for a server, and
# reading a wrk line of bench/report.lua. The sourcing script sets `report`.

say() { printf '%s\n' "$*" | tee -a "$report"; }
note() { printf '… %s\n' "$*" >&2; }

wait_for() { # ADDR: until something listens there
  local _
  for _ in $(seq 200); do
    { : >&3; } 2>/dev/null 3<>"/dev/tcp/${1%:*}/${1#*:}" && return
    sleep 0.05
  done
  echo "no server on $1" >&2
  exit 1
}

ms() { awk -v us="$1" 'BEGIN {printf "%.2f ms", us / 1000}'; }
stat_of() { awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}' <<<"$1"; } # LINE NAME
