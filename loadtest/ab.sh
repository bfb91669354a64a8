#!/usr/bin/env bash
# A/B of echo servers built elsewhere: each LABEL=COMMAND runs alone, pinned to CPU 0 with
# one thread (COMMAND gets `--addr 127.0.0.1:PORT --threads 1` appended), while
# `wsload echo` runs pinned to CPU 1; servers interleave within every round. Prints a line
# per server and round (msgs/s, then server user · kernel · total CPU µs per message, from
# /proc/PID/stat over the wsload run), then the medians.
#
#   loadtest/ab.sh ROUNDS SECS SIZE CONNS LABEL=COMMAND ...
#
# WSLOAD_EXTRA adds arguments to every wsload run (e.g. WSLOAD_EXTRA="--inflight 8").
# Needs target/release/wsload (`cargo build --release -p wsload`).
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n '2,11p' "$0" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
WSLOAD=$PWD/target/release/wsload
[ -x "$WSLOAD" ] || { echo "ab.sh: build $WSLOAD first" >&2; exit 1; }
R=$1; S=$2; SIZE=$3; CONNS=$4; shift 4
TCK=$(getconf CLK_TCK)
SERVER_LOG=$(mktemp)
trap 'rm -f "$SERVER_LOG"' EXIT
declare -A RES
for r in $(seq 1 "$R"); do
  for spec in "$@"; do
    label=${spec%%=*}; cmd=${spec#*=}
    # A random port may be taken (a client's socket in TIME_WAIT holds it): the server
    # then exits at once, and another port is tried.
    for try in 1 2 3 4 5; do
      PORT=$((20000 + RANDOM % 20000))
      # shellcheck disable=SC2086 # COMMAND is a command line
      taskset -c 0 $cmd --addr 127.0.0.1:$PORT --threads 1 >"$SERVER_LOG" 2>&1 &
      SP=$!; sleep 0.4
      kill -0 "$SP" 2>/dev/null && break
      wait "$SP" 2>/dev/null || true
      echo "ab.sh: $label did not start on port $PORT (try $try): $(head -c 200 "$SERVER_LOG")" >&2
      [ "$try" = 5 ] && exit 1
    done
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$SP/stat)
    # shellcheck disable=SC2086 # WSLOAD_EXTRA is a list of arguments
    out=$(taskset -c 1 "$WSLOAD" echo --url ws://127.0.0.1:$PORT/ --conns "$CONNS" \
      --size "$SIZE" --secs "$S" ${WSLOAD_EXTRA:-} 2>/dev/null || true)
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$SP/stat)
    kill "$SP"; wait "$SP" 2>/dev/null || true
    msgs=$(echo "$out" | grep -o '"messages":[0-9]*' | head -1 | cut -d: -f2 || true)
    [ -z "$msgs" ] && msgs=$(echo "$out" | grep -o '"msgs_per_sec":[0-9.]*' | cut -d: -f2 |
      awk -v s="$S" '{print int($1*s)}')
    line=$(awk -v u=$((u1-u0)) -v s=$((s1-s0)) -v m="$msgs" -v t="$TCK" -v S="$S" \
      'BEGIN{printf "%.0f %.2f %.2f %.2f", m/S, u/t*1e6/m, s/t*1e6/m, (u+s)/t*1e6/m}')
    echo "$r $label $line"
    RES[$label]+="$line
"
  done
done
echo "== medians: msgs/s user kernel total (µs/msg)"
for spec in "$@"; do
  label=${spec%%=*}
  printf "%s" "${RES[$label]}" | python3 -c "
import sys, statistics as st
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
print('$label', *['%.2f' % st.median(c) for c in zip(*rows)])"
done
