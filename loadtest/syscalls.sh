#!/usr/bin/env bash
# Syscalls per echoed message, by kind, for each echo server: a perf tracepoint count
# (`perf stat -e syscalls:sys_enter_*` on the server's process) over a whole wsload echo
# run, divided by every echo of that run (wsload's messages_total: warm-up and closing
# included, the same span as the count; not `messages`, the measuring window's only).
# Counts, not timings, so a busy machine changes them little. Scenario `conns` counts per
# connection instead: 2 000 WebSocket connections opened (`wsload idle`), held a second,
# and dropped by the client. A run whose server does not start or dies, or whose wsload
# fails or counts errors, is recorded and tabulated as FAILED, not as a number.
#
#   loadtest/syscalls.sh [--servers a,b,...] [--scenarios 20b,1k,16k,1m,conns] [--secs S]
#                        [--no-build] [--out DIR]
#
# Servers: wsd-epoll, wsd-io-uring (examples/echo), echo_tokio, echo_hyper (the adapters,
# current-thread runtime), fastwebsockets, tokio-tungstenite (loadtest/peers). Scenarios as
# in compare.sh: 20b = 100 connections × 20 B, 1k = 10 × 1 KiB, 16k = 500 × 16 KiB,
# 1m = 1 × 1 MiB, one message in flight per connection. Each server runs alone pinned to
# CPU 0, wsload pinned to CPU 1; traffic only to 127.0.0.1; every step is bounded in time.
# The window includes the handshakes (a few syscalls per connection, against 10^5 and more
# messages). Needs `perf` with tracepoint access (root, or perf_event_paranoid ≤ -1).
#
# Output in --out (default loadtest/results/syscalls): runs.jsonl (per run: server,
# scenario, messages (the window's), messages_total (the divisor), syscalls per message by
# kind, ok and problems) and syscalls.md (the table).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
log() { echo "[syscalls $(date +%H:%M:%S)] $*" >&2; }
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

ARGS="$*"
SERVERS=wsd-epoll,wsd-io-uring,echo_tokio,echo_hyper,fastwebsockets,tokio-tungstenite
SCENARIOS=20b,1k,16k,1m
SECS=4
BUILD=1
OUT=loadtest/results/syscalls
while (($#)); do
    case "$1" in
        --servers) SERVERS=${2:?}; shift ;;
        --scenarios) SCENARIOS=${2:?}; shift ;;
        --secs) SECS=${2:?}; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

[[ $SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$SECS" 'BEGIN{exit !(s > 0)}' ||
    { echo "--secs needs a number above 0" >&2; exit 2; }
command -v perf >/dev/null || { echo "perf is needed (linux-perf)" >&2; exit 1; }
binaries

scenario_args() { # key -> SC_CONNS SC_SIZE (SC_SIZE 0: open and close connections only)
    case "$1" in
        20b) SC_CONNS=100 SC_SIZE=20 ;;
        1k) SC_CONNS=10 SC_SIZE=1024 ;;
        16k) SC_CONNS=500 SC_SIZE=16384 ;;
        1m) SC_CONNS=1 SC_SIZE=1048576 ;;
        conns) SC_CONNS=2000 SC_SIZE=0 ;;
        *) echo "unknown scenario: $1" >&2; return 1 ;;
    esac
}

check_servers "$SERVERS"
IFS=, read -ra scenario_list <<<"$SCENARIOS"
for s in "${scenario_list[@]}"; do scenario_args "$s"; done

if ((BUILD)); then build_echo_servers; fi

EVENTS=(recvfrom sendto recvmsg sendmsg read write readv writev epoll_wait epoll_pwait
    epoll_pwait2 epoll_ctl io_uring_enter io_uring_register futex accept4 getpeername
    setsockopt shutdown close)
event_list=$(printf 'syscalls:sys_enter_%s,' "${EVENTS[@]}")
event_list="raw_syscalls:sys_enter,${event_list%,}"

mkdir -p "$OUT"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
TMP=$(mktemp -d)
SPID="" PERF=""
cleanup() {
    [[ -n $PERF ]] && kill -INT "$PERF" 2>/dev/null || true
    stop_pid "$SPID"
    rm -rf "$TMP"
}
trap cleanup EXIT

port=$((20000 + RANDOM % 20000))
for sc in "${scenario_list[@]}"; do
    scenario_args "$sc"
    for server in "${server_list[@]}"; do
        # A fresh port every time, one nothing listens on (as compare.sh picks them).
        port=$((port + 1))
        while listening "$port"; do port=$((port + 1)); done
        server_cmd "$server" "$port"
        log "$sc ($SC_CONNS × $SC_SIZE B): $server"
        taskset -c 0 "${SERVER_ARGV[@]}" >"$TMP/server.log" 2>&1 &
        SPID=$!
        await_listening "$port" "$SPID" || true
        rc=0 exited=0
        : >"$TMP/wsload.json"
        : >"$TMP/perf.csv"
        if ! listening "$port"; then
            # Recorded as a failed run (rc 125, as compare.sh does), not skipped.
            log "$server did not listen on 127.0.0.1:$port: $(tail -n 2 "$TMP/server.log")"
            rc=125 exited=1
        else
            perf stat -x, -e "$event_list" -p "$SPID" -o "$TMP/perf.csv" &
            PERF=$!
            sleep 0.3
            if ((SC_SIZE)); then
                load=(echo --conns "$SC_CONNS" --size "$SC_SIZE" --secs "$SECS")
            else
                load=(idle --conns "$SC_CONNS" --pid "$SPID" --secs 1)
            fi
            timeout -k 5 $((${SECS%.*} + 60)) taskset -c 1 "$WSLOAD" "${load[@]}" \
                --url "ws://127.0.0.1:$port/" >"$TMP/wsload.json" 2>"$TMP/wsload.log" || rc=$?
            ((rc == 0)) || log "wsload failed (exit $rc): $(grep '^wsload: ' "$TMP/wsload.log" | tail -n 1)"
            # The client's closes reach the server after wsload exits.
            ((SC_SIZE)) || sleep 1
            kill -0 "$SPID" 2>/dev/null || exited=1
            kill -INT "$PERF" 2>/dev/null || true
            wait "$PERF" 2>/dev/null || true
            PERF=""
        fi
        stop_pid "$SPID"
        SPID=""
        python3 - "$server" "$sc" "$TMP/wsload.json" "$TMP/perf.csv" "$rc" "$exited" >>"$RUNS" <<'PY'
import json, sys
server, scenario, wsload_path, perf_path, rc, exited = sys.argv[1:7]
rc = int(rc)
try:
    wsload = json.load(open(wsload_path))
except ValueError:
    wsload = {}
counts = {}
for line in open(perf_path):
    parts = line.strip().split(",")
    if len(parts) < 3 or line.startswith("#") or not parts[0].replace(".", "").isdigit():
        continue
    event = parts[2]
    name = "total" if event == "raw_syscalls:sys_enter" else event.split(":")[-1].replace("sys_enter_", "")
    counts[name] = int(float(parts[0]))
# The count spans the whole wsload run, so it is divided by the whole run's echoes
# (messages_total), or by the connections opened (and closed) for `conns`.
if scenario == "conns":
    messages = total = wsload.get("opened", 0)
else:
    messages, total = wsload.get("messages", 0), wsload.get("messages_total", 0)
problems = []
if rc == 125:
    problems.append("the server did not start")
else:
    if rc:
        problems.append("wsload exit %d" % rc)
    if not wsload:
        problems.append("no JSON from wsload")
    if exited == "1":
        problems.append("the server exited")
    if wsload.get("errors"):
        problems.append("%s wsload errors" % wsload["errors"])
    if wsload and not total:
        problems.append("no messages")
    if "total" not in counts:
        problems.append("no perf counts")
per_msg = {k: v / total for k, v in counts.items() if v and total} if not problems else {}
print(json.dumps({"server": server, "scenario": scenario, "messages": messages,
                  "messages_total": total, "errors": wsload.get("errors"), "rc": rc,
                  "ok": not problems, "problems": problems, "counts": counts,
                  "per_message": per_msg}, sort_keys=True))
PY
        python3 -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
p = r["per_message"]
if not r["ok"]:
    print("    FAILED: " + "; ".join(r["problems"]))
else:
    print("    %s messages over the run, %.3f syscalls/msg: %s" % (r["messages_total"],
          p.get("total", 0), ", ".join("%s %.3f" % (k, v) for k, v in
                                       sorted(p.items(), key=lambda kv: -kv[1])
                                       if k != "total" and v >= 0.001)))' "$RUNS" >&2
    done
done

machine_json "$TMP/machine.json" secs "$SECS"
python3 - "$RUNS" "$TMP/machine.json" "$OUT/syscalls.md" "$ARGS" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = json.load(open(sys.argv[2]))
names = {"20b": "100 × 20 B", "1k": "10 × 1 KiB", "16k": "500 × 16 KiB", "1m": "1 × 1 MiB",
         "conns": "2 000 connections (per connection)"}
out = ["# Syscalls per echoed message", "",
       "Command: `loadtest/syscalls.sh" + (" " + sys.argv[4] if sys.argv[4] else "") + "`", "",
       "Machine: " + ", ".join("%s %s" % (k, machine[k]) for k in
                               ("date", "nproc", "kernel", "commit") if k in machine), "",
       "perf tracepoint counts on the server's process over a whole wsload echo run, "
       "divided by every message echoed in that run (wsload's messages_total, warm-up "
       "and closing included; for *connections*: over a `wsload idle` run, divided by "
       "the connections opened and closed); *other* is every syscall not listed. A "
       "failed run shows FAILED and why.", "",
       "| scenario | server | messages (whole run) | syscalls/msg | by kind |",
       "|---|---|---:|---:|---|"]
for r in runs:
    name = names.get(r["scenario"], r["scenario"])
    if not r.get("ok", True):
        out.append("| %s | %s | - | FAILED | %s |" % (name, r["server"], "; ".join(r["problems"])))
        continue
    p = dict(r["per_message"])
    total = p.pop("total", 0.0)
    listed = sum(p.values())
    if total - listed >= 0.001:
        p["other"] = total - listed
    kinds = ", ".join("%s %.3f" % (k, v) for k, v in sorted(p.items(), key=lambda kv: -kv[1])
                      if v >= 0.001)
    out.append("| %s | %s | %s | %.3f | %s |" % (name, r["server"],
               "{:,}".format(r.get("messages_total", r["messages"])), total, kinds))
open(sys.argv[3], "w").write("\n".join(out) + "\n")
print("\n".join(out))
PY
log "wrote $RUNS and $OUT/syscalls.md"
