#!/usr/bin/env bash
# Multi-core scaling: websocket-driver's echo server (epoll and io_uring) at 1, 2, 4, 8 event
# loops against fastwebsockets with as many tokio workers, pinned the same way, driven by
# wsload echo (100 connections × 20 B, one message in flight each by default).
#
#   loadtest/scaling.sh [--loops 1,2,4,8] [--servers wsd-epoll,wsd-io-uring,fastwebsockets]
#                       [--conns 100] [--size 20] [--secs 5] [--rounds 3]
#                       [--client-threads N] [--inflight K] [--allow-shared] [--no-build]
#                       [--out DIR]
#
# For every round, loop count L and server, in that interleaved order (round 1: L=1 A B C,
# L=2 A B C, …; round 2: the same again), the server starts alone with --threads L, pinned to
# the first L CPUs (taskset -c 0-(L-1)), on a fresh port on 127.0.0.1; wsload runs pinned to
# the upper half of the CPUs (nproc/2 … nproc-1) with --client-threads client loops (default:
# the largest L). While wsload prints its per-second progress lines the script samples the
# server's utime+stime (/proc/PID/stat), so the server CPU per message covers the measuring
# window only (as compare.sh does); then the server gets SIGTERM (SIGKILL 5 s later).
#
# The server and the client never share a CPU: with fewer than 2 × max(L) CPUs the script
# refuses, unless --allow-shared (then it warns and pins wsload to the CPUs the largest
# server leaves, or to the last CPU, shared, when it leaves none).
#
# Servers: wsd-epoll, wsd-io-uring (examples/echo --backend epoll|io-uring --threads L),
# fastwebsockets (loadtest/peers fastwebsockets-echo --threads L: a current-thread tokio
# runtime at L=1, a multi-thread runtime with L workers above), tokio-tungstenite (likewise).
#
# Output in --out (default loadtest/results/scaling): runs.jsonl (one JSON object per run:
# server, loops, round, msgs_per_s, server_cpu_us_per_msg, wsload's JSON, CPU shares),
# scaling.md (medians per server and L: msgs/s, × own 1-loop rate, × fastwebsockets at the
# same L, server CPU µs/msg; the machine; the issue's goals at 8 loops and whether they were
# met; also printed on stdout), logs/ (server and wsload output, git-ignored). The goals:
# ≥ 7× its own 1-loop rate and ≥ 1.2× fastwebsockets, both at 8 loops. All traffic is to
# 127.0.0.1; every step is bounded in time. See loadtest/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND="loadtest/scaling.sh${*:+ $*}"

LOOPS="1,2,4,8"
SERVERS="wsd-epoll,wsd-io-uring,fastwebsockets"
CONNS=100
SIZE=20
SECS=5
ROUNDS=3
CLIENT_THREADS=""
INFLIGHT=1
ALLOW_SHARED=0
BUILD=1
OUT="$ROOT/loadtest/results/scaling"
PORT_BASE=${PORT_BASE:-19500}

log() { printf '[scaling %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
die() { log "error: $*"; exit 1; }
usage() {
    sed -n '2,33p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while (($#)); do
    case "$1" in
        --loops) LOOPS=${2:?}; shift ;;
        --servers) SERVERS=${2:?}; shift ;;
        --conns) CONNS=${2:?}; shift ;;
        --size) SIZE=${2:?}; shift ;;
        --secs) SECS=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --client-threads) CLIENT_THREADS=${2:?}; shift ;;
        --inflight) INFLIGHT=${2:?}; shift ;;
        --allow-shared) ALLOW_SHARED=1 ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        -h | --help) usage 0 ;;
        *) echo "scaling.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
posint() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
posint "$ROUNDS" || die "--rounds needs a positive integer"
posint "$CONNS" || die "--conns needs a positive integer"
posint "$SIZE" || die "--size needs a positive integer"
posint "$INFLIGHT" || die "--inflight needs a positive integer"
[[ $SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--secs needs a number"
IFS=, read -ra loop_list <<<"$LOOPS"
IFS=, read -ra server_list <<<"$SERVERS"
((${#loop_list[@]})) || die "--loops is empty"
((${#server_list[@]})) || die "--servers is empty"
MAX_LOOPS=0
for l in "${loop_list[@]}"; do
    posint "$l" || die "--loops takes positive integers separated by commas, not '$l'"
    if ((l > MAX_LOOPS)); then MAX_LOOPS=$l; fi
done
for s in "${server_list[@]}"; do
    case "$s" in
        wsd-epoll | wsd-io-uring | fastwebsockets | tokio-tungstenite) ;;
        *) die "unknown server $s (wsd-epoll, wsd-io-uring, fastwebsockets, tokio-tungstenite)" ;;
    esac
done
CLIENT_THREADS=${CLIENT_THREADS:-$MAX_LOOPS}
posint "$CLIENT_THREADS" || die "--client-threads needs a positive integer"

for tool in taskset timeout python3 cargo getconf mkfifo; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

# ----- CPUs -----
# The CPUs this script may use (its affinity: normally 0 … nproc-1), in order; "CPU i" below is
# the i-th of them.
CPUS=()
cpus_list=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
IFS=, read -ra specs <<<"$cpus_list"
for spec in "${specs[@]}"; do
    if [[ $spec == *-* ]]; then
        for ((c = ${spec%-*}; c <= ${spec#*-}; c++)); do CPUS+=("$c"); done
    else
        CPUS+=("$spec")
    fi
done
NCPU=${#CPUS[@]}
((NCPU == $(nproc))) || die "parsed $NCPU CPUs from Cpus_allowed_list '$cpus_list', nproc says $(nproc)"

cpu_range() { # first count -> "a-b" / "a,b,c" list of CPUS[first … first+count-1]
    local first=$1 count=$2 i out="" start prev c
    start=${CPUS[first]} prev=$start
    for ((i = first + 1; i < first + count; i++)); do
        c=${CPUS[i]}
        if ((c == prev + 1)); then prev=$c; continue; fi
        out+=${out:+,}$start$([[ $start == "$prev" ]] || echo "-$prev")
        start=$c prev=$c
    done
    out+=${out:+,}$start$([[ $start == "$prev" ]] || echo "-$prev")
    echo "$out"
}

if ((NCPU < 2 * MAX_LOOPS && !ALLOW_SHARED)); then
    die "--loops up to $MAX_LOOPS needs $((2 * MAX_LOOPS)) CPUs (the server on CPUs 0-$((MAX_LOOPS - 1)), wsload on the upper half, none shared); this machine has $NCPU. Run on a larger machine, lower --loops, or pass --allow-shared to run anyway (numbers then not comparable)"
fi
((MAX_LOOPS <= NCPU)) || die "--loops up to $MAX_LOOPS needs at least $MAX_LOOPS CPUs for the server alone; this machine has $NCPU"
SHARED=0
if ((NCPU >= 2 * MAX_LOOPS)); then
    CLIENT_FIRST=$((NCPU / 2)) CLIENT_COUNT=$((NCPU - NCPU / 2))
else # --allow-shared
    if ((MAX_LOOPS < NCPU)); then
        CLIENT_FIRST=$MAX_LOOPS CLIENT_COUNT=$((NCPU - MAX_LOOPS))
        log "warning: $NCPU CPUs < 2 × $MAX_LOOPS loops (--allow-shared): wsload gets only the $CLIENT_COUNT CPU(s) the largest server leaves; at $MAX_LOOPS loops the client, not the server, may set the pace"
    else
        CLIENT_FIRST=$((NCPU - 1)) CLIENT_COUNT=1 SHARED=1
        log "warning: $NCPU CPUs < 2 × $MAX_LOOPS loops (--allow-shared): wsload on CPU ${CPUS[NCPU - 1]}, which the server at $MAX_LOOPS loops shares: those numbers do not measure scaling"
    fi
fi
CLIENT_CPUS=$(cpu_range "$CLIENT_FIRST" "$CLIENT_COUNT")
if ((CLIENT_THREADS > CLIENT_COUNT)); then
    log "warning: $CLIENT_THREADS client threads on $CLIENT_COUNT CPU(s) ($CLIENT_CPUS): they share cores"
fi

# ----- binaries -----
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PEERS_TARGET=${CARGO_TARGET_DIR:-$ROOT/loadtest/peers/target}
WSLOAD=$TARGET/release/wsload
ECHO=$TARGET/release/examples/echo
FASTWS=$PEERS_TARGET/release/fastwebsockets-echo
TUNGSTENITE=$PEERS_TARGET/release/tungstenite-echo
in_servers() { [[ ,$SERVERS, == *,$1,* ]]; }
NEED_WSD=0 NEED_PEERS=0
if in_servers wsd-epoll || in_servers wsd-io-uring; then NEED_WSD=1; fi
if in_servers fastwebsockets || in_servers tokio-tungstenite; then NEED_PEERS=1; fi
if ((BUILD)); then
    log "building in release: wsload$( ((NEED_WSD)) && echo ", the echo example")$( ((NEED_PEERS)) && echo ", the peers")"
    cargo build --release -p wsload || die "cargo build -p wsload failed"
    if ((NEED_WSD)); then
        cargo build --release -p websocket-driver --example echo || die "cargo build --example echo failed"
    fi
    if ((NEED_PEERS)); then
        cargo build --release --manifest-path loadtest/peers/Cargo.toml || die "building loadtest/peers failed"
    fi
fi
needed=("$WSLOAD")
if ((NEED_WSD)); then needed+=("$ECHO"); fi
if in_servers fastwebsockets; then needed+=("$FASTWS"); fi
if in_servers tokio-tungstenite; then needed+=("$TUNGSTENITE"); fi
for bin in "${needed[@]}"; do
    [[ -x $bin ]] || die "$bin missing (run without --no-build)"
done

scaled_server_cmd() { # name port loops -> SERVER_ARGV
    local addr=127.0.0.1:$2
    case "$1" in
        wsd-epoll) SERVER_ARGV=("$ECHO" --addr "$addr" --backend epoll --threads "$3") ;;
        wsd-io-uring) SERVER_ARGV=("$ECHO" --addr "$addr" --backend io-uring --threads "$3") ;;
        fastwebsockets) SERVER_ARGV=("$FASTWS" --addr "$addr" --threads "$3") ;;
        tokio-tungstenite) SERVER_ARGV=("$TUNGSTENITE" --addr "$addr" --threads "$3") ;;
        *) die "unknown server $1" ;;
    esac
}

# ----- run state, cleanup -----
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
CLK_TCK=$(getconf CLK_TCK)
load1=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if $load1 > $NCPU / 4 else 1)"; then
    log "warning: load average $load1 before starting: other work on this machine will skew the numbers"
fi
mkdir -p "$OUT/logs"
echo '*' >"$OUT/logs/.gitignore" # per-run logs stay out of git
RUNS=$OUT/runs.jsonl
: >"$RUNS"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/wsd-scaling.XXXXXX")
SPID="" LPID="" SAMPLER=""

stop_server() { # SIGTERM, SIGKILL after 5 s
    stop_pid "$SPID"
    SPID=""
}
cleanup() {
    local p
    for p in $LPID $SAMPLER; do
        kill -TERM "$p" 2>/dev/null || true
    done
    stop_server
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ----- machine info -----
server_pins=""
for l in "${loop_list[@]}"; do server_pins+="${server_pins:+; }$(cpu_range 0 "$l") at $l loop(s)"; done
MACHINE=$OUT/logs/machine.json
machine_json "$MACHINE" \
    nproc "$NCPU" cpus "$cpus_list" \
    pinning "server: taskset -c $server_pins; wsload: taskset -c $CLIENT_CPUS, $CLIENT_THREADS client threads" \
    shared "$( ((SHARED || (ALLOW_SHARED && NCPU < 2 * MAX_LOOPS))) && echo true || echo false)" \
    load "wsload echo --conns $CONNS --size $SIZE --inflight $INFLIGHT --threads $CLIENT_THREADS" \
    "rounds x secs" "$ROUNDS x $SECS s"
log "$NCPU CPUs; servers on the first L of them, wsload on $CLIENT_CPUS ($CLIENT_THREADS threads); loops $LOOPS; $ROUNDS round(s) × $SECS s"

# ----- runs -----
PORT=$PORT_BASE
start_server() { # name loops logfile -> SPID, PORT (a fresh port every time: no TIME_WAIT reuse)
    local name=$1 loops=$2 logfile=$3 i
    PORT=$((PORT + 1))
    while listening "$PORT"; do PORT=$((PORT + 1)); done
    scaled_server_cmd "$name" "$PORT" "$loops"
    taskset -c "$(cpu_range 0 "$loops")" "${SERVER_ARGV[@]}" >"$logfile" 2>&1 &
    SPID=$!
    for ((i = 0; i < 100; i++)); do # up to 10 s
        if listening "$PORT"; then return 0; fi
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    log "$name did not start listening on 127.0.0.1:$PORT (see $logfile)"
    stop_server
    return 1
}

run_one() { # server loops round
    local server=$1 loops=$2 round=$3 tag out samples wlog fifo before after t0 t1 c0 c1 rc limit exited=()
    tag="L$loops-r$round-$server"
    out=$TMP/$tag.json samples=$TMP/$tag.samples wlog=$OUT/logs/$tag.wsload.log fifo=$TMP/$tag.fifo
    : >"$samples"
    : >"$wlog"
    log "$loops loop(s), round $round/$ROUNDS: $server (taskset -c $(cpu_range 0 "$loops"))"
    if ! start_server "$server" "$loops" "$OUT/logs/$tag.server.log"; then
        echo '{}' >"$out"
        python3 loadtest/report.py record --kind echo --server "$server" --scenario "$CONNS×$SIZE B" \
            --round "$round" --json "$out" --rc 125 --server-exited |
            python3 loadtest/scaling_report.py tag --loops "$loops" --client-threads "$CLIENT_THREADS" \
                --server-cpus "$(cpu_range 0 "$loops")" --client-cpus "$CLIENT_CPUS" >>"$RUNS"
        return 0
    fi
    limit=$(python3 -c "print(int($SECS) + 90)")
    mkfifo "$fifo"
    sample_progress "$SPID" "$samples" "$wlog" <"$fifo" &
    SAMPLER=$!
    before=$(cpu_ticks "$SPID")
    times >"$TMP/times0"
    t0=$EPOCHREALTIME
    # In the background and waited for, so that an interrupt reaches the trap at once.
    timeout -k 5 "$limit" taskset -c "$CLIENT_CPUS" "$WSLOAD" echo --url "ws://127.0.0.1:$PORT/" \
        --conns "$CONNS" --size "$SIZE" --inflight "$INFLIGHT" --threads "$CLIENT_THREADS" \
        --secs "$SECS" >"$out" 2>"$fifo" &
    LPID=$!
    rc=0
    wait "$LPID" || rc=$?
    LPID=""
    t1=$EPOCHREALTIME
    times >"$TMP/times1"
    wait "$SAMPLER" || true
    SAMPLER=""
    rm -f "$fifo"
    after=$(cpu_ticks "$SPID")
    c0=$(children_cpu_s "$TMP/times0")
    c1=$(children_cpu_s "$TMP/times1")
    kill -0 "$SPID" 2>/dev/null || exited=(--server-exited)
    stop_server
    python3 loadtest/report.py record --kind echo --server "$server" --scenario "$CONNS×$SIZE B" \
        --round "$round" --json "$out" --samples "$samples" --cpu-before "$before" \
        --cpu-after "$after" --clk-tck "$CLK_TCK" \
        --client-cpu-s "$(python3 -c "print(max(0.0, $c1 - $c0))")" \
        --wall-s "$(python3 -c "print($t1 - $t0)")" --rc "$rc" "${exited[@]}" |
        python3 loadtest/scaling_report.py tag --loops "$loops" --client-threads "$CLIENT_THREADS" \
            --server-cpus "$(cpu_range 0 "$loops")" --client-cpus "$CLIENT_CPUS" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 loadtest/scaling_report.py show >&2
}

start=$SECONDS
for ((round = 1; round <= ROUNDS; round++)); do
    for loops in "${loop_list[@]}"; do
        for server in "${server_list[@]}"; do
            run_one "$server" "$loops" "$round"
        done
    done
done
log "all runs done in $((SECONDS - start)) s"
machine_json_end "$MACHINE"

echo
python3 loadtest/scaling_report.py summarize --runs "$RUNS" --machine-json "$MACHINE" \
    --command "$COMMAND" --out "$OUT/scaling.md"
