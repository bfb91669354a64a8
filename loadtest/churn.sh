#!/usr/bin/env bash
# Connection churn: what a connection's whole life costs each echo server. `wsload churn`
# keeps --conns connections under way; each is opened, upgraded, sent one 20 B message,
# answered, and closed with a close handshake, then replaced. Per server and round: cycles
# per second, and the server's CPU per cycle (user and kernel, from /proc/PID/stat over the
# wsload run, the warm-up included). Rounds are interleaved; the table gives medians.
#
#   loadtest/churn.sh [--servers a,b,...] [--conns N] [--secs S] [--rounds R] [--no-build]
#                     [--out DIR]
#
# Servers as in compare.sh (wsd-epoll, wsd-io-uring, base-epoll, base-io-uring with
# BASELINE_ECHO=path, echo_tokio, echo_hyper, fastwebsockets, tokio-tungstenite). Each
# server runs alone, pinned to CPU 0, wsload to CPU 1; traffic only to 127.0.0.1; every step
# is bounded in time. The server closes first (it ends the close handshake), so the
# TIME_WAIT sockets are its own and the client's ports are free again at once.
# wsload's core is usually the busier one here: cycles/s is partly the client's, CPU per
# cycle is the server's own figure. A round whose server does not start or dies, or whose
# wsload fails, is recorded as failed (not in "rounds ok", not in the medians); the other
# rounds go on.
#
# Output in --out (default loadtest/results/churn): runs.jsonl (one line per run) and
# churn.md (the table).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "[churn $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

ARGS="$*"
SERVERS=wsd-epoll,wsd-io-uring,fastwebsockets,tokio-tungstenite
CONNS=50
SECS=5
ROUNDS=3
BUILD=1
OUT=loadtest/results/churn
while (($#)); do
    case "$1" in
        --servers) SERVERS=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --secs) SECS=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
[[ $CONNS =~ ^[1-9][0-9]*$ && $ROUNDS =~ ^[1-9][0-9]*$ && $SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] &&
    awk -v s="$SECS" 'BEGIN{exit !(s > 0)}' ||
    { echo "--conns and --rounds need positive integers, --secs a number above 0" >&2; exit 2; }

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
CLK_TCK=$(getconf CLK_TCK)
machine_json "$TMP/machine.json" conns "$CONNS" secs "$SECS" rounds "$ROUNDS"

port=$((20000 + RANDOM % 20000))
for ((round = 1; round <= ROUNDS; round++)); do
    for server in "${server_list[@]}"; do
        # A fresh port every time, one nothing listens on (as compare.sh picks them).
        port=$((port + 1))
        while listening "$port"; do port=$((port + 1)); done
        server_cmd "$server" "$port"
        log "round $round/$ROUNDS: $server"
        taskset -c 0 "${SERVER_ARGV[@]}" >"$TMP/server.log" 2>&1 &
        SPID=$!
        await_listening "$port" "$SPID" || true
        rc=0 exited=0 before=-1 after=-1
        : >"$TMP/wsload.json"
        if ! listening "$port"; then
            # Recorded as a failed round (rc 125, as compare.sh does), not skipped.
            log "$server did not listen on 127.0.0.1:$port: $(tail -n 2 "$TMP/server.log")"
            rc=125 exited=1
        else
            before=$(cpu_ticks_split "$SPID")
            timeout -k 5 "$(python3 -c "print(int($SECS) + 60)")" taskset -c 1 "$WSLOAD" churn \
                --url "ws://127.0.0.1:$port/" --conns "$CONNS" --secs "$SECS" \
                >"$TMP/wsload.json" 2>"$TMP/wsload.log" || rc=$?
            after=$(cpu_ticks_split "$SPID")
            kill -0 "$SPID" 2>/dev/null || exited=1
            ((rc == 0)) || log "wsload exit $rc: $(grep '^wsload: ' "$TMP/wsload.log" | tail -n 1)"
        fi
        stop_pid "$SPID"
        SPID=""
        python3 - "$server" "$round" "$rc" "$before" "$after" "$CLK_TCK" "$TMP/wsload.json" \
            "$exited" >>"$RUNS" <<'PY'
import json, sys
server, rnd, rc, before, after, tck, path, exited = sys.argv[1:9]
try:
    w = json.load(open(path))
except ValueError:
    w = {}
# "TOTAL:USER" ticks, or -1 once the server is gone: then there is no CPU figure.
ticks = lambda s: tuple(map(int, s.split(":"))) if ":" in s else None
before, after = ticks(before), ticks(after)
gone = exited == "1" or before is None or after is None
tck = int(tck)
conns = w.get("connections", 0)
per = lambda t: t / tck * 1e6 / conns if conns and not gone else None
(t0, u0), (t1, u1) = (before, after) if not gone else ((0, 0), (0, 0))
print(json.dumps({"server": server, "round": int(rnd), "rc": int(rc), "wsload": w,
                  "server_exited": gone,
                  "server_cpu_us_per_conn": per(t1 - t0),
                  "server_user_us_per_conn": per(u1 - u0),
                  "server_kernel_us_per_conn": per((t1 - t0) - (u1 - u0))}))
PY
        tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r["wsload"]
cpu = r["server_cpu_us_per_conn"]
if r["rc"] == 125:
    problems = ["the server did not start"]
else:
    problems = (["wsload exit %d" % r["rc"]] if r["rc"] else []) + (
        ["the server exited"] if r["server_exited"] else [])
print("    %s cycles/s, p99 %s us, server %s us/connection, %s errors%s" % (
    format(w.get("cycles_per_sec", 0), ",.0f"), w.get("p99_us", "-"),
    "-" if cpu is None else format(cpu, ".1f"), w.get("errors", "-"),
    "  FAILED: " + "; ".join(problems) if problems else ""))' >&2
    done
done

machine_json_end "$TMP/machine.json"
python3 - "$RUNS" "$TMP/machine.json" "$OUT/churn.md" "$ARGS" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = json.load(open(sys.argv[2]))
servers = list(dict.fromkeys(r["server"] for r in runs))
med = lambda xs: statistics.median(xs) if xs else None
f = lambda x, d: "-" if x is None else format(x, ",.%df" % d)
out = ["# Connection churn", "",
       "Command: `loadtest/churn.sh" + (" " + sys.argv[4] if sys.argv[4] else "") + "`", "",
       "Machine: " + ", ".join("%s %s" % (k, machine[k]) for k in
                               ("date", "nproc", "cpu", "kernel", "commit", "loadavg at start",
                                "loadavg at end") if k in machine), "",
       "%s connections under way, each: connect, upgrade, one 20 B echo, close handshake "
       "(1000). Medians of %s rounds; server CPU per connection is over the whole wsload run "
       "(warm-up included) divided by the connections it made." % (machine["conns"], machine["rounds"]), "",
       "| server | cycles/s | p99 µs | server CPU µs/connection | user · kernel | errors | rounds ok |",
       "|---|---:|---:|---:|---|---:|---:|"]
for s in servers:
    rs = [r for r in runs if r["server"] == s]
    # A round whose server did not start or died, or whose wsload failed, is counted in
    # "rounds ok" as not ok and left out of the medians.
    ok = [r for r in rs if r["rc"] == 0 and r["wsload"].get("errors") == 0
          and not r.get("server_exited")]
    pick = lambda k: med([r[k] for r in ok if r.get(k) is not None])
    out.append("| %s | %s | %s | %s | %s · %s | %d | %d/%d |" % (
        s, f(med([r["wsload"]["cycles_per_sec"] for r in ok]), 0),
        f(med([r["wsload"]["p99_us"] for r in ok]), 0),
        f(pick("server_cpu_us_per_conn"), 1), f(pick("server_user_us_per_conn"), 1),
        f(pick("server_kernel_us_per_conn"), 1),
        sum(r["wsload"].get("errors", 0) for r in rs), len(ok), len(rs)))
open(sys.argv[3], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
log "wrote $RUNS and $OUT/churn.md"
