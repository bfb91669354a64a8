#!/usr/bin/env bash
# User-space instructions per echoed message for each echo server: the server runs under
# valgrind's callgrind (which counts every instruction the process executes outside the
# kernel) through two `wsload echo` runs of different lengths, and the difference of the
# two totals over the difference of the two runs' echoes (wsload's messages_total) is the
# cost of one more message: start-up, handshakes and shutdown cancel out. Counts, not
# timings: a busy or noisy machine changes them little (the one thing load changes is how
# many messages one wake-up finds, so compare servers measured in the same run). Kernel
# time is not in them (see syscalls.sh for the syscalls). Under callgrind a server runs
# some 20-50 times slower, so the message rates here mean nothing.
#
#   loadtest/instructions.sh [--servers a,b,...] [--size B] [--conns N] [--short S]
#                            [--long S] [--top K] [--no-build] [--out DIR]
#
# Servers: wsd-epoll, wsd-io-uring (examples/echo; valgrind 3.19 runs io_uring, but what
# the kernel does for a ring is not counted), echo_tokio, echo_hyper (the adapters,
# current-thread runtime), fastwebsockets (loadtest/peers). tokio-tungstenite is accepted
# but not a default: under callgrind, which runs one thread at a time, it echoed a few
# hundred messages a second, and its difference measured start-up, not messages. Defaults: 100 connections × 20 B, runs of 3 and 10 s,
# one message in flight per connection, wsload pinned to CPU 1 and the server to CPU 0.
# Traffic only to 127.0.0.1; every step is bounded in time.
#
# Output in --out (default loadtest/results/instructions): runs.jsonl (per server: both
# runs' totals and echoes, instructions per message), instructions.md (the table), and
# SERVER.top.txt (the functions with the most instructions of their own in the long run,
# per echoed message of that run, start-up included: a guide to where they go).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "[instructions $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

ARGS="$*"
SERVERS=wsd-epoll,wsd-io-uring,echo_tokio,echo_hyper,fastwebsockets
SIZE=20 CONNS=100 SHORT=3 LONG=10 TOP=25 BUILD=1
OUT=loadtest/results/instructions
while (($#)); do
    case "$1" in
        --servers) SERVERS=${2:?}; shift ;;
        --size) SIZE=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --short) SHORT=${2:?}; shift ;;
        --long) LONG=${2:?}; shift ;;
        --top) TOP=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
for n in "$SIZE" "$CONNS" "$SHORT" "$LONG" "$TOP"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "sizes, counts and seconds are positive integers" >&2; exit 2; }
done
((LONG > SHORT)) || { echo "--long must be longer than --short" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
binaries

check_servers "$SERVERS"
if ((BUILD)); then build_echo_servers; fi

mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
TMP=$(mktemp -d)
SPID=""
cleanup() {
    stop_pid "$SPID"
    rm -rf "$TMP"
}
trap cleanup EXIT

# One run: the server under callgrind, `wsload echo` for $2 seconds, then SIGTERM (callgrind
# writes its totals as the process ends). Writes "INSTRUCTIONS MESSAGES_TOTAL" to
# $TMP/TAG.result, or leaves it empty. (Not a command substitution: the server's pid must
# stay in this shell, for the cleanup on exit.)
run_once() { # server secs port tag
    local server=$1 secs=$2 port=$3 tag=$4
    : >"$TMP/$tag.result"
    server_cmd "$server" "$port"
    taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$TMP/$tag.out" \
        --dump-line=no "${SERVER_ARGV[@]}" >"$TMP/$tag.server.log" 2>&1 &
    SPID=$!
    # Start-up under valgrind takes a few seconds.
    local i
    for i in $(seq 150); do
        listening "$port" && break
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.2
    done
    if ! listening "$port"; then
        log "$server did not listen under valgrind: $(tail -n 2 "$TMP/$tag.server.log")"
        stop_pid "$SPID"; SPID=""
        return 0
    fi
    local rc=0
    timeout -k 5 $((secs + 60)) taskset -c 1 "$WSLOAD" echo --url "ws://127.0.0.1:$port/" \
        --conns "$CONNS" --size "$SIZE" --secs "$secs" >"$TMP/$tag.json" 2>"$TMP/$tag.wsload.log" || rc=$?
    sleep 1
    kill -TERM "$SPID" 2>/dev/null || true
    for i in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.2; done
    stop_pid "$SPID"; SPID=""
    ((rc == 0)) || { log "wsload failed (exit $rc)"; return 0; }
    python3 - "$TMP/$tag.out" "$TMP/$tag.json" >"$TMP/$tag.result" <<'PY'
import json, sys
total = None
for line in open(sys.argv[1]):
    if line.startswith(("summary:", "totals:")):
        total = int(line.split()[1])
        break
w = json.load(open(sys.argv[2]))
if total and w.get("messages_total") and not w.get("errors"):
    print(total, w["messages_total"])
PY
}

port=$((20000 + RANDOM % 20000))
for server in "${server_list[@]}"; do
    results=()
    for secs in "$SHORT" "$LONG"; do
        port=$((port + 1))
        while listening "$port"; do port=$((port + 1)); done
        log "$server: $CONNS × $SIZE B for $secs s under callgrind"
        run_once "$server" "$secs" "$port" "$server.$secs"
        results+=("$(cat "$TMP/$server.$secs.result")")
    done
    if [[ -f $TMP/$server.$LONG.out && -n ${results[1]} ]]; then
        total=$(echo "${results[1]}" | cut -d' ' -f2)
        callgrind_annotate "$TMP/$server.$LONG.out" 2>/dev/null |
            python3 -c '
import re, sys
n, top, k = int(sys.argv[1]), int(sys.argv[2]), 0
for line in sys.stdin:
    m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$", line)
    if m and "PROGRAM TOTALS" not in line and k < top:
        k += 1
        print("%8.1f  %s" % (int(m[1].replace(",", "")) / n, m[2]))' "$total" "$TOP" >"$OUT/$server.top.txt" || true
    fi
    python3 - "$server" "${results[0]}" "${results[1]}" "$SHORT" "$LONG" >>"$RUNS" <<'PY'
import json, sys
server, short, long_, s_secs, l_secs = sys.argv[1:6]
rec = {"server": server, "short_secs": int(s_secs), "long_secs": int(l_secs), "ok": False}
if short and long_:
    (i1, m1), (i2, m2) = (map(int, short.split()), map(int, long_.split()))
    rec.update(short={"instructions": i1, "messages_total": m1},
               long={"instructions": i2, "messages_total": m2})
    if m2 > m1:
        rec["ok"] = True
        rec["instructions_per_message"] = round((i2 - i1) / (m2 - m1), 1)
print(json.dumps(rec, sort_keys=True))
PY
    python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
print("    " + ("%s instructions per echoed message" % r["instructions_per_message"] if r["ok"] else "FAILED"))' "$RUNS" >&2
done

machine_json "$TMP/machine.json" size "$SIZE" conns "$CONNS"
python3 - "$RUNS" "$TMP/machine.json" "$OUT/instructions.md" "$ARGS" "$SIZE" "$CONNS" <<'PY'
import json, subprocess, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = json.load(open(sys.argv[2]))
size, conns = sys.argv[5], sys.argv[6]
ref = next((r for r in runs if r["server"] == "fastwebsockets" and r["ok"]), None)
out = ["# User-space instructions per echoed message (callgrind)", "",
       "Command: `loadtest/instructions.sh %s`" % sys.argv[4], "",
       "Machine: %s" % ", ".join("%s %s" % kv for kv in sorted(machine.items())), "",
       "%s connections × %s B, one message in flight each. Each server ran under callgrind "
       "through a short and a long `wsload echo` run; instructions per message = the "
       "difference of the two runs' totals ÷ the difference of their echoes." % (conns, size), "",
       "| server | instructions / msg | × fastwebsockets | echoes (short · long run) |",
       "|---|---:|---:|---:|"]
for r in runs:
    if not r["ok"]:
        out.append("| %s | FAILED | | |" % r["server"])
        continue
    x = "%.2f×" % (r["instructions_per_message"] / ref["instructions_per_message"]) if ref else ""
    out.append("| %s | %.0f | %s | %d · %d |" % (r["server"], r["instructions_per_message"], x,
               r["short"]["messages_total"], r["long"]["messages_total"]))
open(sys.argv[3], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
