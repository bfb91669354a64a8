#!/usr/bin/env bash
# A/B of echo servers built elsewhere: each LABEL=COMMAND runs alone, pinned to CPU 0 with
# one thread (COMMAND gets `--addr 127.0.0.1:PORT --threads 1` appended), while
# `wsload echo` runs pinned to CPU 1; servers interleave within every round. Prints a line
# per server and round, then the medians of the good runs:
#   msgs/s: wsload's msgs_per_sec (echoes in its measuring window ÷ the window's measured
#     length);
#   user · kernel · total µs/msg: the server's CPU (/proc/PID/stat) over the whole wsload
#     run ÷ every echo of that run (wsload's messages_total), so both span the same time
#     (the handshakes, warm-up and close included, as in syscalls.sh).
# A run whose server did not start, whose wsload failed or printed no JSON, or whose server
# died is printed as FAILED with the reason; one whose wsload counted errors is printed
# with its numbers and FLAGGED. Neither goes into the medians. wsload's and the servers'
# output stay in the log directory (AB_LOGS=DIR, default a new /tmp/ab.XXXXXX).
#
#   loadtest/ab.sh ROUNDS SECS SIZE CONNS LABEL=COMMAND ...
#
# WSLOAD_EXTRA adds arguments to every wsload run (e.g. WSLOAD_EXTRA="--inflight 8").
# Needs wsload built in release (`cargo build --release -p wsload`), under
# CARGO_TARGET_DIR if set, else target/. Traffic only to 127.0.0.1; every run is bounded
# by `timeout`; the server is stopped on exit, Ctrl-C or SIGTERM (SIGKILL after 5 s).
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,21p' "$0" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "ab.sh: $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh
binaries
[ -x "$WSLOAD" ] || { log "build $WSLOAD first"; exit 1; }
R=$1; S=$2; SIZE=$3; CONNS=$4; shift 4
[[ $R =~ ^[1-9][0-9]*$ && $SIZE =~ ^[0-9]+$ && $CONNS =~ ^[1-9][0-9]*$ ]] ||
  { log "ROUNDS and CONNS need positive integers, SIZE an integer"; exit 2; }
[[ $S =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$S" 'BEGIN{exit !(s > 0)}' ||
  { log "SECS needs a number above 0"; exit 2; }
for spec in "$@"; do
  [[ $spec == ?*=?* ]] || { log "not LABEL=COMMAND: $spec"; exit 2; }
done
TCK=$(getconf CLK_TCK)
LIMIT=$(awk -v s="$S" 'BEGIN{print int(s) + 90}')
LOGS=${AB_LOGS:-$(mktemp -d /tmp/ab.XXXXXX)}
mkdir -p "$LOGS"
log "logs in $LOGS"
SP="" WP=""
# A server started in the background ignores the terminal's SIGINT (no job control in a
# script), so without this it would outlive an interrupted A/B.
cleanup() {
  stop_pid "$WP"
  stop_pid "$SP"
  WP="" SP=""
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

start_server() { # label command logfile -> SP, PORT; fails if it never listened
  local label=$1 cmd=$2 slog=$3 try
  # A random port may be taken (a client's socket in TIME_WAIT holds it): the server
  # then exits at once, and another port is tried.
  for try in 1 2 3 4 5; do
    PORT=$((20000 + RANDOM % 20000))
    while listening "$PORT"; do PORT=$((PORT + 1)); done
    # shellcheck disable=SC2086 # COMMAND is a command line
    taskset -c 0 $cmd --addr "127.0.0.1:$PORT" --threads 1 >"$slog" 2>&1 &
    SP=$!
    await_listening "$PORT" "$SP" && return 0
    log "$label did not start listening on 127.0.0.1:$PORT (try $try): $(head -c 200 "$slog")"
    stop_pid "$SP"
    SP=""
  done
  return 1
}

declare -A RES FAILED
for r in $(seq 1 "$R"); do
  for spec in "$@"; do
    label=${spec%%=*}; cmd=${spec#*=}
    tag="r$r-${label//[^A-Za-z0-9._-]/_}"
    if ! start_server "$label" "$cmd" "$LOGS/$tag.server.log"; then
      echo "$r $label FAILED: the server did not start (see $LOGS/$tag.server.log)"
      FAILED[$label]=$((${FAILED[$label]:-0} + 1))
      continue
    fi
    c0=$(cpu_ticks_split "$SP")
    rc=0
    # In the background, waited for: a trapped signal ends `wait` at once (a foreground
    # command would run to its end first; `timeout` keeps it from the terminal's Ctrl-C).
    # shellcheck disable=SC2086 # WSLOAD_EXTRA is a list of arguments
    timeout -k 5 "$LIMIT" taskset -c 1 "$WSLOAD" echo --url "ws://127.0.0.1:$PORT/" \
      --conns "$CONNS" --size "$SIZE" --secs "$S" ${WSLOAD_EXTRA:-} \
      >"$LOGS/$tag.json" 2>"$LOGS/$tag.wsload.log" &
    WP=$!
    wait "$WP" || rc=$?
    WP=""
    c1=$(cpu_ticks_split "$SP")
    alive=1
    kill -0 "$SP" 2>/dev/null || alive=0
    stop_pid "$SP"
    SP=""
    # "ok MSGS/S USER KERNEL TOTAL", "flagged ERRORS MSGS/S USER KERNEL TOTAL" or
    # "failed REASON".
    verdict=$(python3 - "$LOGS/$tag.json" "$LOGS/$tag.wsload.log" "$rc" "$c0" "$c1" "$TCK" "$alive" <<'PY'
import json, sys
path, wlog, rc, c0, c1, tck, alive = sys.argv[1:8]
def fail(why):
    print("failed", why)
    sys.exit()
try:
    w = json.load(open(path))
except ValueError:
    w = None
if w is None or rc != "0":
    # wsload's last own line says why (the usage text after it does not).
    said = [l for l in open(wlog, errors="replace").read().splitlines() if l.startswith("wsload: ")]
    fail("wsload exit %s%s: %s" % (rc, "" if w else ", no JSON", said[-1] if said else "no output"))
if alive != "1" or c0 == "-1" or c1 == "-1":
    fail("the server exited during the run")
total = w.get("messages_total")
if not total:
    fail("no echoes over the run (messages_total %r)" % total)
(t0, u0), (t1, u1) = (map(int, c0.split(":")), map(int, c1.split(":")))
per = lambda ticks: ticks / int(tck) * 1e6 / total
nums = "%.0f %.2f %.2f %.2f" % (w["msgs_per_sec"], per(u1 - u0), per((t1 - t0) - (u1 - u0)),
                                per(t1 - t0))
print("flagged %d %s" % (w["errors"], nums) if w.get("errors") else "ok " + nums)
PY
    ) || verdict="failed its numbers could not be read"
    read -r status rest <<<"$verdict"
    case "$status" in
      ok)
        echo "$r $label $rest"
        RES[$label]+="$rest
" ;;
      flagged)
        read -r errors nums <<<"$rest"
        echo "$r $label $nums  FLAGGED: $errors errors (see $LOGS/$tag.wsload.log)"
        FAILED[$label]=$((${FAILED[$label]:-0} + 1)) ;;
      *)
        echo "$r $label FAILED: $rest (see $LOGS/$tag.wsload.log)"
        FAILED[$label]=$((${FAILED[$label]:-0} + 1)) ;;
    esac
  done
done
echo "== medians of the good runs: msgs/s user kernel total (µs/msg)"
for spec in "$@"; do
  label=${spec%%=*}
  printf "%s" "${RES[$label]:-}" | python3 -c "
import sys, statistics as st
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
meds = ['%.2f' % st.median(c) for c in zip(*rows)] if rows else ['-'] * 4
print(sys.argv[1], *meds, '(%d of %s runs; %s failed or flagged)' % (len(rows), sys.argv[2], sys.argv[3]))" \
    "$label" "$R" "${FAILED[$label]:-0}"
done
