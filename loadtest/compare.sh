#!/usr/bin/env bash
# Side-by-side comparison: websocket-driver's echo server (epoll and io_uring) against
# tokio-tungstenite and fastwebsockets echo servers (loadtest/peers), driven by wsload.
#
#   loadtest/compare.sh [--rounds R] [--secs S] [--quick] [--idle-conns N] [--idle-secs S]
#                       [--servers a,b,...] [--scenarios 20b,1k,16k,1m,slow] [--no-idle] [--no-build]
#                       [--slow-conns N] [--flood-size B] [--out DIR]
#
# Scenario slow: wsload slow, one flooder that sends 64 KiB messages and never reads, next to
# --slow-conns (10) echo clients of 1 KiB; records the server's RSS growth and whether the
# flooder got disconnected. A server that dies there is recorded, not fatal.
#
# Servers: wsd-epoll, wsd-io-uring, echo_tokio, echo_hyper (the tokio and hyper adapters,
# current-thread runtime), tokio-tungstenite, fastwebsockets, and base-epoll /
# base-io-uring: an earlier build of the echo example named by BASELINE_ECHO=path, to
# measure a change before and after in one interleaved run.
#
# Each server runs alone pinned to CPU 0 (one thread / worker), wsload pinned to CPU 1; for
# every scenario and round the servers run in the same interleaved order A B C D, A B C D, …
# Medians over rounds go to a table on stdout and to loadtest/results/compare.{json,md,svg};
# every run's raw numbers to loadtest/results/runs.jsonl, server and wsload logs to
# loadtest/results/logs/ (not committed). All traffic is to 127.0.0.1; every step is bounded
# in time. See loadtest/README.md.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND="loadtest/compare.sh${*:+ $*}"

ROUNDS=3
SECS=5
IDLE_CONNS=10000
IDLE_SECS=3
IDLE=1
BUILD=1
SERVERS="wsd-epoll,wsd-io-uring,echo_tokio,echo_hyper,tokio-tungstenite,fastwebsockets"
SCENARIOS="20b,1k,16k,1m,slow"
SLOW_CONNS=10
SLOW_SIZE=1024
FLOOD_SIZE=65536
OUT="$ROOT/loadtest/results"
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT_BASE=${PORT_BASE:-19300}

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
while (($#)); do
    case "$1" in
        --rounds) ROUNDS=${2:?}; shift ;;
        --secs) SECS=${2:?}; shift ;;
        --quick) ROUNDS=1; SECS=2; IDLE_SECS=2 ;;
        --idle-conns) IDLE_CONNS=${2:?}; shift ;;
        --idle-secs) IDLE_SECS=${2:?}; shift ;;
        --servers) SERVERS=${2:?}; shift ;;
        --scenarios) SCENARIOS=${2:?}; shift ;;
        --no-idle) IDLE=0 ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        --slow-conns) SLOW_CONNS=${2:?}; shift ;;
        --flood-size) FLOOD_SIZE=${2:?}; shift ;;
        -h | --help) usage 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --rounds needs a positive integer" >&2; exit 2; }
[[ $SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "compare.sh: --secs needs a number" >&2; exit 2; }
[[ $SLOW_CONNS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --slow-conns needs a positive integer" >&2; exit 2; }
[[ $FLOOD_SIZE =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --flood-size needs a positive integer" >&2; exit 2; }

log() { printf '[compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in taskset timeout python3 cargo getconf; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
(($(nproc --all) >= 2)) || die "needs at least 2 CPUs (server on CPU $SERVER_CPU, load on CPU $CLIENT_CPU)"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PEERS_TARGET=${CARGO_TARGET_DIR:-$ROOT/loadtest/peers/target}
WSLOAD=$TARGET/release/wsload
ECHO=$TARGET/release/examples/echo
ECHO_TOKIO=$TARGET/release/examples/echo_tokio
ECHO_HYPER=$TARGET/release/examples/echo_hyper
TUNGSTENITE=$PEERS_TARGET/release/tungstenite-echo
FASTWS=$PEERS_TARGET/release/fastwebsockets-echo

if ((BUILD)); then
    log "building in release: wsload, the echo example, the peers"
    cargo build --release -p wsload || die "cargo build -p wsload failed"
    cargo build --release -p websocket-driver --example echo || die "cargo build --example echo failed"
    cargo build --release -p websocket-driver --features hyper --example echo_tokio --example echo_hyper ||
        die "cargo build --example echo_tokio/echo_hyper failed"
    cargo build --release --manifest-path loadtest/peers/Cargo.toml || die "building loadtest/peers failed"
fi
for bin in "$WSLOAD" "$ECHO" "$ECHO_TOKIO" "$ECHO_HYPER" "$TUNGSTENITE" "$FASTWS"; do
    [[ -x $bin ]] || die "$bin missing (run without --no-build)"
done

# 10 000 idle connections need that many descriptors in the server (and in wsload).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if ((IDLE && $(ulimit -n) < IDLE_CONNS + 100)); then
    log "open-files limit $(ulimit -n) < $IDLE_CONNS + 100: idle runs may not hold every connection"
fi

CLK_TCK=$(getconf CLK_TCK)
load1=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if $load1 > 0.5 else 1)"; then
    log "warning: load average $load1 before starting: other work on this machine will skew the numbers"
fi
mkdir -p "$OUT/logs"
RUNS=$OUT/runs.jsonl
: >"$RUNS"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/wsd-compare.XXXXXX")
SPID=""
cleanup() {
    [[ -n $SPID ]] && stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ----- machine info -----
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
python3 - "$OUT/logs/machine.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u '+%Y-%m-%d %H:%M UTC')",
    "nproc": $(nproc),
    "cpu": """${cpu_model:-unknown}""",
    "kernel": "$(uname -sr)",
    "memory": "$(free -h 2>/dev/null | awk '/^Mem:/{print $2}')",
    "loadavg at start": "$(cut -d' ' -f1-3 /proc/loadavg)",
    "rustc": "$(rustc --version 2>/dev/null)",
    "commit": "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')",
    "pinning": "server: taskset -c $SERVER_CPU, wsload: taskset -c $CLIENT_CPU",
    "rounds x secs": "$ROUNDS x $SECS s",
}, open(sys.argv[1], "w"), indent=1)
EOF

# ----- servers -----
PORT=$PORT_BASE
server_cmd() { # name port -> the command line, as an array in SERVER_ARGV
    local addr=127.0.0.1:$2
    case "$1" in
        wsd-epoll) SERVER_ARGV=("$ECHO" --addr "$addr" --backend epoll --threads 1) ;;
        wsd-io-uring) SERVER_ARGV=("$ECHO" --addr "$addr" --backend io-uring --threads 1) ;;
        # An earlier build of the echo example (BASELINE_ECHO=path), for before/after runs.
        base-epoll) SERVER_ARGV=("${BASELINE_ECHO:?set BASELINE_ECHO}" --addr "$addr" --backend epoll --threads 1) ;;
        base-io-uring) SERVER_ARGV=("${BASELINE_ECHO:?set BASELINE_ECHO}" --addr "$addr" --backend io-uring --threads 1) ;;
        echo_tokio) SERVER_ARGV=("$ECHO_TOKIO" --addr "$addr" --threads 1) ;;
        echo_hyper) SERVER_ARGV=("$ECHO_HYPER" --addr "$addr" --threads 1) ;;
        tokio-tungstenite) SERVER_ARGV=("$TUNGSTENITE" --addr "$addr" --threads 1) ;;
        fastwebsockets) SERVER_ARGV=("$FASTWS" --addr "$addr" --threads 1) ;;
        *) return 1 ;;
    esac
}

listening() { # port: a LISTEN socket on 127.0.0.1:port (or any address), without connecting
    local hex
    hex=$(printf '%04X' "$1")
    grep -qE "^ *[0-9]+: (0100007F|00000000):$hex 00000000:0000 0A" /proc/net/tcp 2>/dev/null
}

start_server() { # name logfile -> SPID, PORT (a fresh port every time: no TIME_WAIT reuse)
    local name=$1 logfile=$2 i
    PORT=$((PORT + 1))
    while listening "$PORT"; do PORT=$((PORT + 1)); done
    server_cmd "$name" "$PORT" || die "unknown server $name"
    taskset -c "$SERVER_CPU" "${SERVER_ARGV[@]}" >"$logfile" 2>&1 &
    SPID=$!
    for ((i = 0; i < 100; i++)); do # up to 10 s
        listening "$PORT" && return 0
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    log "$name did not start listening on 127.0.0.1:$PORT (see $logfile)"
    stop_server
    return 1
}

stop_server() { # SIGTERM, SIGKILL after 5 s
    local i
    [[ -n $SPID ]] || return 0
    kill -TERM "$SPID" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$SPID" 2>/dev/null; then
        log "server $SPID ignored SIGTERM for 5 s: SIGKILL"
        kill -KILL "$SPID" 2>/dev/null
    fi
    wait "$SPID" 2>/dev/null
    SPID=""
}

cpu_ticks() { # pid -> utime + stime of the whole process, in clock ticks (-1 if gone)
    local stat f
    read -r stat <"/proc/$1/stat" 2>/dev/null || { echo -1; return; }
    stat=${stat##*) } # the command name may hold spaces; fields resume after ") "
    read -ra f <<<"$stat"
    echo $((f[11] + f[12])) # utime (field 14) and stime (field 15)
}

# `times` must run in this shell (not in a $(...) subshell, whose children are its own): its
# second line is the user and system time of every child this shell has reaped, which is
# how wsload's CPU time is taken (the pipeline's processes are reaped before the second call).
children_cpu_s() { # file from `times >file` -> user + system seconds of reaped children
    python3 -c '
import re, sys
line = open(sys.argv[1]).read().splitlines()[-1]  # "0m1.234s 0m0.567s"
print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line)))' "$1"
}

# Stamps each wsload progress line with the wall clock and the server's CPU ticks.
sample_progress() { # pid samples-file log-file
    local line
    while IFS= read -r line; do
        if [[ $line == wsload:*msgs/s* ]]; then
            printf '%s %s %s\n' "$EPOCHREALTIME" "$(cpu_ticks "$1")" "$line" >>"$2"
        fi
        printf '%s\n' "$line" >>"$3"
    done
}

scenario() { # key -> SC_NAME SC_CONNS SC_SIZE
    case "$1" in
        20b) SC_NAME="100×20 B" SC_CONNS=100 SC_SIZE=20 ;;
        1k) SC_NAME="10×1 KiB" SC_CONNS=10 SC_SIZE=1024 ;;
        16k) SC_NAME="500×16 KiB" SC_CONNS=500 SC_SIZE=16384 ;;
        1m) SC_NAME="1×1 MiB" SC_CONNS=1 SC_SIZE=1048576 ;;
        slow) SC_NAME="slow reader" SC_CONNS=$SLOW_CONNS SC_SIZE=$SLOW_SIZE ;;
        *) die "unknown scenario $1 (20b, 1k, 16k, 1m, slow)" ;;
    esac
}

IFS=, read -ra server_list <<<"$SERVERS"
IFS=, read -ra scenario_list <<<"$SCENARIOS"
for s in "${server_list[@]}"; do server_cmd "$s" 0 || die "unknown server $s"; done
for k in "${scenario_list[@]}"; do scenario "$k"; done

run_echo() { # server scenario-key round
    local server=$1 key=$2 round=$3 tag out samples wlog before after c0 c1 t0 t1 rc exited=()
    scenario "$key"
    tag="echo-$key-r$round-$server"
    out=$TMP/$tag.json samples=$TMP/$tag.samples wlog=$OUT/logs/$tag.wsload.log
    : >"$samples"
    : >"$wlog"
    log "$SC_NAME round $round/$ROUNDS: $server"
    if ! start_server "$server" "$OUT/logs/$tag.server.log"; then
        echo '{}' >"$out"
        python3 loadtest/report.py record --kind echo --server "$server" --scenario "$SC_NAME" \
            --round "$round" --json "$out" --rc 125 --server-exited >>"$RUNS"
        return
    fi
    before=$(cpu_ticks "$SPID")
    times >"$TMP/times0"
    t0=$EPOCHREALTIME
    timeout -k 5 "$(python3 -c "print(int($SECS) + 90)")" \
        taskset -c "$CLIENT_CPU" "$WSLOAD" echo --url "ws://127.0.0.1:$PORT/" \
        --conns "$SC_CONNS" --size "$SC_SIZE" --secs "$SECS" \
        2>&1 >"$out" | sample_progress "$SPID" "$samples" "$wlog"
    rc=${PIPESTATUS[0]}
    t1=$EPOCHREALTIME
    times >"$TMP/times1"
    after=$(cpu_ticks "$SPID")
    c0=$(children_cpu_s "$TMP/times0")
    c1=$(children_cpu_s "$TMP/times1")
    kill -0 "$SPID" 2>/dev/null || exited=(--server-exited)
    stop_server
    python3 loadtest/report.py record --kind echo --server "$server" --scenario "$SC_NAME" \
        --round "$round" --json "$out" --samples "$samples" --cpu-before "$before" \
        --cpu-after "$after" --clk-tck "$CLK_TCK" \
        --client-cpu-s "$(python3 -c "print(max(0.0, $c1 - $c0))")" \
        --wall-s "$(python3 -c "print($t1 - $t0)")" --rc "$rc" "${exited[@]}" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r.get("wsload") or {}
cpu = r.get("server_cpu_us_per_msg")
print("    %s msgs/s, p99 %s us, server %s us/msg%s" % (
    format(w.get("msgs_per_sec", 0), ",.0f"), w.get("p99_us", "-"),
    "-" if cpu is None else format(cpu, ".2f"),
    "" if r["ok"] else "  PROBLEM: " + "; ".join(r.get("problems", []))))' >&2
}

run_slow() { # server round: one flooder that never reads + SLOW_CONNS echo clients
    local server=$1 round=$2 tag out wlog rc exited=()
    scenario slow
    tag="slow-r$round-$server"
    out=$TMP/$tag.json wlog=$OUT/logs/$tag.wsload.log
    log "slow reader ($SC_CONNS×$SC_SIZE B echo + one $FLOOD_SIZE B flooder) round $round/$ROUNDS: $server"
    if ! start_server "$server" "$OUT/logs/$tag.server.log"; then
        echo '{}' >"$out"
        python3 loadtest/report.py record --kind slow --server "$server" --scenario "$SC_NAME" \
            --round "$round" --json "$out" --rc 125 --server-exited >>"$RUNS"
        return
    fi
    timeout -k 5 "$(python3 -c "print(int($SECS) + 90)")" \
        taskset -c "$CLIENT_CPU" "$WSLOAD" slow --url "ws://127.0.0.1:$PORT/" \
        --conns "$SC_CONNS" --size "$SC_SIZE" --flood-size "$FLOOD_SIZE" --secs "$SECS" \
        --pid "$SPID" >"$out" 2>"$wlog"
    rc=$?
    # A server the flooder took down (or the OOM killer did) is a result, not a failure here.
    kill -0 "$SPID" 2>/dev/null || exited=(--server-exited)
    stop_server
    python3 loadtest/report.py record --kind slow --server "$server" --scenario "$SC_NAME" \
        --round "$round" --json "$out" --rc "$rc" "${exited[@]}" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r.get("wsload") or {}
print("    %s msgs/s, p99 %s us, server RSS +%s MiB, flooder sent %s MiB, disconnected %s%s" % (
    format(w.get("msgs_per_sec", 0), ",.0f"), w.get("p99_us", "-"),
    format(w.get("server_rss_growth_max_kib", 0) / 1024, ".1f"),
    format(w.get("flooder_bytes_sent", 0) / 2**20, ".1f"),
    "yes" if w.get("flooder_disconnected") else "no",
    "" if r["ok"] else "  PROBLEM: " + "; ".join(r.get("problems", []))))' >&2
}

run_idle() { # server round
    local server=$1 round=$2 tag out wlog rc exited=()
    tag="idle-r$round-$server"
    out=$TMP/$tag.json wlog=$OUT/logs/$tag.wsload.log
    log "idle $IDLE_CONNS connections, round $round/$ROUNDS: $server"
    if ! start_server "$server" "$OUT/logs/$tag.server.log"; then
        echo '{}' >"$out"
        python3 loadtest/report.py record --kind idle --server "$server" --scenario idle \
            --round "$round" --json "$out" --rc 125 --server-exited >>"$RUNS"
        return
    fi
    timeout -k 5 "$(python3 -c "print(int($IDLE_SECS) + 180)")" \
        taskset -c "$CLIENT_CPU" "$WSLOAD" idle --url "ws://127.0.0.1:$PORT/" \
        --conns "$IDLE_CONNS" --pid "$SPID" --secs "$IDLE_SECS" >"$out" 2>"$wlog"
    rc=$?
    kill -0 "$SPID" 2>/dev/null || exited=(--server-exited)
    stop_server
    python3 loadtest/report.py record --kind idle --server "$server" --scenario idle \
        --round "$round" --json "$out" --rc "$rc" "${exited[@]}" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r.get("wsload") or {}
print("    %s held, %s bytes/conn%s" % (w.get("held", "-"), w.get("bytes_per_conn", "-"),
    "" if r["ok"] else "  PROBLEM: " + "; ".join(r.get("problems", []))))' >&2
}

start=$SECONDS
for key in "${scenario_list[@]}"; do
    for ((round = 1; round <= ROUNDS; round++)); do
        for server in "${server_list[@]}"; do
            if [[ $key == slow ]]; then
                run_slow "$server" "$round"
            else
                run_echo "$server" "$key" "$round"
            fi
        done
    done
done
if ((IDLE)); then
    for ((round = 1; round <= ROUNDS; round++)); do
        for server in "${server_list[@]}"; do
            run_idle "$server" "$round"
        done
    done
fi
log "all runs done in $((SECONDS - start)) s"
python3 - "$OUT/logs/machine.json" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
m["loadavg at end"] = sys.argv[2]
json.dump(m, open(sys.argv[1], "w"), indent=1)
EOF

echo
python3 loadtest/report.py summarize --runs "$RUNS" --out "$OUT" --command "$COMMAND" \
    --machine-json "$OUT/logs/machine.json"
