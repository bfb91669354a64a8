#!/usr/bin/env bash
# Side-by-side comparison: websocket-driver's echo server (epoll and io_uring) against
# tokio-tungstenite and fastwebsockets echo servers (loadtest/peers), and its pub/sub server
# against pub/sub peers on the same two crates, driven by wsload.
#
#   loadtest/compare.sh [--rounds R] [--secs S] [--quick] [--idle-conns N] [--idle-secs S]
#                       [--servers a,b,...] [--scenarios 20b,20b-p8,1k,16k,1m,slow,bcast100,bcast500,fanout10k,deflate]
#                       [--no-idle] [--no-build] [--slow-conns N] [--flood-size B]
#                       [--fanout-subs N] [--fanout-rate R] [--out DIR]
#
# Scenario 20b-p8 (not in the default list): 100×20 B with 8 messages in flight per
# connection (wsload --inflight 8), reported as its own row group: in the plain 20b row one
# wsload core sets the pace, here the server's core does.
# Scenario slow: wsload slow, one flooder that sends 64 KiB messages and never reads, next to
# --slow-conns (10) echo clients of 1 KiB; records the server's RSS growth and whether the
# flooder got disconnected. A server that dies there is recorded, not fatal.
# Pub/sub scenarios (--scenarios pubsub = all three; not in the default list): bcast100 and
# bcast500 (wsload broadcast: N clients on one topic, each sends one 20 B message a round, a
# round ends when all N*N deliveries arrived), fanout10k (wsload fanout: one publisher,
# --fanout-subs (10000) subscribers, --fanout-rate (20) publishes/s of 16 B).
#
# Scenario deflate (not in the default list): 10 clients echoing 1 KiB JSON-like text with
# permessage-deflate (wsload echo --json --deflate; the echo example with --deflate, Node's
# ws with perMessageDeflate as the peer that supports it: server node-ws, installed by
# interop/deflate.sh into target/interop); records the wire bytes per message each way. With
# it, the idle runs also hold --idle-conns deflate connections (server "NAME+deflate").
# --scenarios idle runs only the idle-memory measurement (--scenarios idle,deflate-idle: the
# deflate idle runs too).
#
# Servers: wsd-epoll, wsd-io-uring (the echo example, or examples/pubsub in pub/sub
# scenarios), echo_tokio, echo_hyper (the tokio and hyper adapters, current-thread runtime),
# tokio-tungstenite, fastwebsockets (echo), node-ws (deflate), pubsub-tungstenite,
# pubsub-fastwebsockets (pub/sub), and base-epoll / base-io-uring: an earlier build of the
# echo example named by BASELINE_ECHO=path (BASELINE_PUBSUB=path in pub/sub scenarios), to
# measure a change before and after in one interleaved run. Each scenario runs the listed
# servers that fit it. PUBSUB_EXAMPLE=name runs another example as wsd's pub/sub server.
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
SERVERS="wsd-epoll,wsd-io-uring,echo_tokio,echo_hyper,tokio-tungstenite,fastwebsockets,pubsub-tungstenite,pubsub-fastwebsockets"
SCENARIOS="20b,1k,16k,1m,slow"
FANOUT_SUBS=10000
FANOUT_RATE=20
IDLE_SET=0
SLOW_CONNS=10
SLOW_SIZE=1024
FLOOD_SIZE=65536
OUT="$ROOT/loadtest/results"
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
PORT_BASE=${PORT_BASE:-19300}

usage() {
    sed -n '2,36p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
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
        --no-idle) IDLE=0 IDLE_SET=1 ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        --slow-conns) SLOW_CONNS=${2:?}; shift ;;
        --flood-size) FLOOD_SIZE=${2:?}; shift ;;
        --fanout-subs) FANOUT_SUBS=${2:?}; shift ;;
        --fanout-rate) FANOUT_RATE=${2:?}; shift ;;
        -h | --help) usage 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --rounds needs a positive integer" >&2; exit 2; }
[[ $SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$SECS" 'BEGIN{exit !(s > 0)}' ||
    { echo "compare.sh: --secs needs a number above 0" >&2; exit 2; }
[[ $SLOW_CONNS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --slow-conns needs a positive integer" >&2; exit 2; }
[[ $FLOOD_SIZE =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --flood-size needs a positive integer" >&2; exit 2; }
[[ $FANOUT_SUBS =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: --fanout-subs needs a positive integer" >&2; exit 2; }
# wsload fanout refuses a rate of 0 (it would never publish) or under one per window.
[[ $FANOUT_RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] &&
    awk -v r="$FANOUT_RATE" -v s="$SECS" 'BEGIN{exit !(r > 0 && r * s >= 1)}' ||
    { echo "compare.sh: --fanout-rate needs a number above 0, at least one per --secs" >&2; exit 2; }
SCENARIOS=${SCENARIOS//pubsub/bcast100,bcast500,fanout10k}

log() { printf '[compare %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
die() { log "error: $*"; exit 1; }

for tool in taskset timeout python3 cargo getconf; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
(($(nproc --all) >= 2)) || die "needs at least 2 CPUs (server on CPU $SERVER_CPU, load on CPU $CLIENT_CPU)"

kind_of() { # scenario key -> echo | slow | broadcast | fanout (empty if unknown)
    case "$1" in
        20b | 1k | 16k | 1m | 20b-p8) echo echo ;;
        slow) echo slow ;;
        bcast100 | bcast500) echo broadcast ;;
        fanout10k) echo fanout ;;
        deflate) echo deflate ;;
    esac
}
fits() { # server kind: whether the server takes part in that kind of scenario
    case "$1" in
        wsd-* | base-*) return 0 ;;
        tokio-tungstenite | fastwebsockets | echo_tokio | echo_hyper) [[ $2 == echo || $2 == slow || $2 == idle ]] ;;
        node-ws) [[ $2 == deflate ]] ;;
        pubsub-*) [[ $2 == broadcast || $2 == fanout ]] ;;
        *) return 1 ;;
    esac
}

IFS=, read -ra server_list <<<"$SERVERS"
IFS=, read -ra scenario_list <<<"$SCENARIOS"
# "idle" alone (or "idle,deflate-idle") runs only the idle-memory measurement.
if [[ $SCENARIOS == idle || $SCENARIOS == idle,deflate-idle ]]; then
    [[ $SCENARIOS == idle,deflate-idle ]] && IDLE_DEFLATE_ONLY=1
    scenario_list=() IDLE=1 IDLE_SET=1
fi
NEED_ECHO=0 NEED_PUBSUB=0 NEED_DEFLATE=${IDLE_DEFLATE_ONLY:-0}
for k in "${scenario_list[@]}"; do
    case "$(kind_of "$k")" in
        echo | slow) NEED_ECHO=1 ;;
        deflate) NEED_ECHO=1 NEED_DEFLATE=1 ;;
        broadcast | fanout) NEED_PUBSUB=1 ;;
        *) die "unknown scenario $k (20b, 20b-p8, 1k, 16k, 1m, slow, bcast100, bcast500, fanout10k, pubsub, deflate; or idle / idle,deflate-idle alone)" ;;
    esac
done
# Idle memory goes with the echo scenarios: a pub/sub-only run leaves it out unless asked.
((NEED_ECHO || IDLE_SET)) || IDLE=0
((IDLE)) && NEED_ECHO=1
# The tokio/hyper adapter examples are built only when an echo scenario lists them.
NEED_ADAPTERS=0
if ((NEED_ECHO)) && [[ ,$SERVERS, == *,echo_tokio,* || ,$SERVERS, == *,echo_hyper,* ]]; then
    NEED_ADAPTERS=1
fi

binaries
# Node's ws for the deflate scenario, where interop/deflate.sh installs it.
export WS_MODULE=${WS_MODULE:-$ROOT/target/interop/node/node_modules/ws}

# ----- servers and scenarios (checked before anything is built or written) -----
scenario() { # key -> SC_NAME SC_CONNS SC_SIZE SC_KIND (SC_RATE for fanout)
    SC_KIND=$(kind_of "$1") SC_RATE="" SC_INFLIGHT=1
    case "$1" in
        20b) SC_NAME="100×20 B" SC_CONNS=100 SC_SIZE=20 ;;
        # Pipelined: 8 messages in flight per connection, so one wsload core offers more
        # than one server loop can echo (the 20b row is bound by the client's core).
        20b-p8) SC_NAME="100×20 B, 8 in flight" SC_CONNS=100 SC_SIZE=20 SC_INFLIGHT=8 ;;
        1k) SC_NAME="10×1 KiB" SC_CONNS=10 SC_SIZE=1024 ;;
        16k) SC_NAME="500×16 KiB" SC_CONNS=500 SC_SIZE=16384 ;;
        1m) SC_NAME="1×1 MiB" SC_CONNS=1 SC_SIZE=1048576 ;;
        slow) SC_NAME="slow reader" SC_CONNS=$SLOW_CONNS SC_SIZE=$SLOW_SIZE ;;
        bcast100) SC_NAME="broadcast 100" SC_CONNS=100 SC_SIZE=20 ;;
        bcast500) SC_NAME="broadcast 500" SC_CONNS=500 SC_SIZE=20 ;;
        fanout10k) SC_NAME="fanout 1→$FANOUT_SUBS @ $FANOUT_RATE/s" SC_CONNS=$FANOUT_SUBS SC_SIZE=16 SC_RATE=$FANOUT_RATE ;;
        deflate) SC_NAME="10×1 KiB JSON, deflate" SC_CONNS=10 SC_SIZE=1024 ;;
        *) die "unknown scenario $1" ;;
    esac
}

for s in "${server_list[@]}"; do
    fits "$s" echo || fits "$s" fanout || fits "$s" deflate || die "unknown server $s"
done
for k in "${scenario_list[@]}"; do
    scenario "$k"
    n=0
    for s in "${server_list[@]}"; do
        fits "$s" "$SC_KIND" || continue
        server_cmd "$s" 0 "$SC_KIND"
        n=$((n + 1))
    done
    ((n)) || die "no server in --servers $SERVERS runs scenario $k"
done

examples=()
((NEED_ECHO)) && examples+=(--example echo)
((NEED_PUBSUB)) && examples+=(--example "$PUBSUB_EXAMPLE")
if ((BUILD)); then
    log "building in release: wsload, the examples (${examples[*]}), the peers"
    cargo build --release -p wsload || die "cargo build -p wsload failed"
    cargo build --release -p websocket-driver "${examples[@]}" || die "cargo build ${examples[*]} failed"
    if ((NEED_ADAPTERS)); then
        cargo build --release -p websocket-driver --features hyper --example echo_tokio --example echo_hyper ||
            die "cargo build --example echo_tokio/echo_hyper failed"
    fi
    cargo build --release --manifest-path loadtest/peers/Cargo.toml || die "building loadtest/peers failed"
fi
needed=("$WSLOAD")
# Only the binaries of the servers taking part.
in_servers() { [[ ,$SERVERS, == *,$1,* ]]; }
((NEED_ECHO)) && needed+=("$ECHO")
((NEED_ECHO)) && in_servers tokio-tungstenite && needed+=("$TUNGSTENITE")
((NEED_ECHO)) && in_servers fastwebsockets && needed+=("$FASTWS")
((NEED_ADAPTERS)) && in_servers echo_tokio && needed+=("$ECHO_TOKIO")
((NEED_ADAPTERS)) && in_servers echo_hyper && needed+=("$ECHO_HYPER")
((NEED_PUBSUB)) && needed+=("$PUBSUB")
((NEED_PUBSUB)) && in_servers pubsub-tungstenite && needed+=("$PS_TUNGSTENITE")
((NEED_PUBSUB)) && in_servers pubsub-fastwebsockets && needed+=("$PS_FASTWS")
for bin in "${needed[@]}"; do
    [[ -x $bin ]] || die "$bin missing (run without --no-build)"
done
if ((NEED_DEFLATE)) && [[ ,$SERVERS, == *,node-ws,* ]] && [[ ! -f $WS_MODULE/package.json ]]; then
    die "node-ws needs Node's ws in $WS_MODULE (interop/deflate.sh installs it)"
fi

# 10 000 idle connections or fan-out subscribers need that many descriptors in the server
# (and in wsload).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if ((IDLE && $(ulimit -n) < IDLE_CONNS + 100)); then
    log "open-files limit $(ulimit -n) < $IDLE_CONNS + 100: idle runs may not hold every connection"
fi
if [[ ,$SCENARIOS, == *,fanout10k,* ]] && (($(ulimit -n) < FANOUT_SUBS + 100)); then
    log "open-files limit $(ulimit -n) < $FANOUT_SUBS + 100: fanout runs may not open every subscriber"
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
machine_json "$OUT/logs/machine.json" \
    pinning "server: taskset -c $SERVER_CPU, wsload: taskset -c $CLIENT_CPU" \
    "rounds x secs" "$ROUNDS x $SECS s"

# ----- servers -----
PORT=$PORT_BASE

start_server() { # name logfile [kind] -> SPID, PORT (a fresh port every time: no TIME_WAIT reuse)
    local name=$1 logfile=$2
    PORT=$((PORT + 1))
    while listening "$PORT"; do PORT=$((PORT + 1)); done
    server_cmd "$name" "$PORT" "${3:-echo}" || die "unknown server $name"
    taskset -c "$SERVER_CPU" "${SERVER_ARGV[@]}" >"$logfile" 2>&1 &
    SPID=$!
    await_listening "$PORT" "$SPID" && return 0
    log "$name did not start listening on 127.0.0.1:$PORT (see $logfile)"
    stop_server
    return 1
}

stop_server() { # SIGTERM, SIGKILL after 5 s
    stop_pid "$SPID"
    SPID=""
}

run_load() { # server scenario-key round: echo, broadcast or fanout
    local server=$1 key=$2 round=$3 tag out samples wlog before after c0 c1 t0 t1 rc limit exited=() load
    scenario "$key"
    tag="$SC_KIND-$key-r$round-$server"
    out=$TMP/$tag.json samples=$TMP/$tag.samples wlog=$OUT/logs/$tag.wsload.log
    : >"$samples"
    : >"$wlog"
    log "$SC_NAME round $round/$ROUNDS: $server"
    if ! start_server "$server" "$OUT/logs/$tag.server.log" "$SC_KIND"; then
        echo '{}' >"$out"
        python3 loadtest/report.py record --kind "${SC_KIND/deflate/echo}" --server "$server" --scenario "$SC_NAME" \
            --round "$round" --json "$out" --rc 125 --server-exited >>"$RUNS"
        return
    fi
    case "$SC_KIND" in
        echo) limit=$(python3 -c "print(int($SECS) + 90)")
            load=(echo --url "ws://127.0.0.1:$PORT/" --conns "$SC_CONNS" --size "$SC_SIZE" --inflight "${SC_INFLIGHT:-1}") ;;
        # Every client on one topic (path).
        broadcast) limit=$(python3 -c "print(int($SECS) + 90)")
            load=(broadcast --url "ws://127.0.0.1:$PORT/bench" --conns "$SC_CONNS" --size "$SC_SIZE") ;;
        # Opening 10 000 connections, the warm-up second, up to 10 s for stragglers, closing.
        fanout) limit=$(python3 -c "print(int($SECS) + 200)")
            load=(fanout --url "ws://127.0.0.1:$PORT/bench" --subs "$SC_CONNS" --rate "$SC_RATE") ;;
        deflate) limit=$(python3 -c "print(int($SECS) + 90)")
            load=(echo --url "ws://127.0.0.1:$PORT/" --conns "$SC_CONNS" --size "$SC_SIZE" --json --deflate) ;;
    esac
    before=$(cpu_ticks "$SPID")
    times >"$TMP/times0"
    t0=$EPOCHREALTIME
    timeout -k 5 "$limit" taskset -c "$CLIENT_CPU" "$WSLOAD" "${load[@]}" --secs "$SECS" \
        2>&1 >"$out" | sample_progress "$SPID" "$samples" "$wlog"
    rc=${PIPESTATUS[0]}
    t1=$EPOCHREALTIME
    times >"$TMP/times1"
    after=$(cpu_ticks "$SPID")
    c0=$(children_cpu_s "$TMP/times0")
    c1=$(children_cpu_s "$TMP/times1")
    kill -0 "$SPID" 2>/dev/null || exited=(--server-exited)
    stop_server
    python3 loadtest/report.py record --kind "${SC_KIND/deflate/echo}" --server "$server" --scenario "$SC_NAME" \
        --round "$round" --json "$out" --samples "$samples" --cpu-before "$before" \
        --cpu-after "$after" --clk-tck "$CLK_TCK" \
        --client-cpu-s "$(python3 -c "print(max(0.0, $c1 - $c0))")" \
        --wall-s "$(python3 -c "print($t1 - $t0)")" --rc "$rc" "${exited[@]}" >>"$RUNS"
    tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r.get("wsload") or {}
cpu = r.get("server_cpu_us_per_msg")
cpu = "-" if cpu is None else format(cpu, ".2f")
problem = "" if r["ok"] else "  PROBLEM: " + "; ".join(r.get("problems", []))
if r["kind"] == "echo":
    wire = " (wire %s B out, %s B in per msg)" % (w["wire_out_per_msg"], w["wire_in_per_msg"]) if w.get("deflate") else ""
    print("    %s msgs/s, p99 %s us, server %s us/msg%s%s" % (
        format(w.get("msgs_per_sec", 0), ",.0f"), w.get("p99_us", "-"), cpu, wire, problem))
else:
    print("    %s%s deliveries/s, p50 %s us, p99 %s us%s, server %s us/delivery, %s missing%s" % (
        format(w.get("rounds_per_sec", 0), ",.1f") + " rounds/s, " if r["kind"] == "broadcast" else "",
        format(w.get("deliveries_per_sec", 0), ",.0f"), w.get("p50_us", "-"), w.get("p99_us", "-"),
        " (round time)" if r["kind"] == "broadcast" else "", cpu, w.get("missing", "-"), problem))' >&2
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
    local deflate=()
    [[ $server == *+deflate ]] && deflate=(--deflate)
    timeout -k 5 "$(python3 -c "print(int($IDLE_SECS) + 180)")" \
        taskset -c "$CLIENT_CPU" "$WSLOAD" idle --url "ws://127.0.0.1:$PORT/" \
        --conns "$IDLE_CONNS" --pid "$SPID" --secs "$IDLE_SECS" "${deflate[@]}" >"$out" 2>"$wlog"
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
            scenario "$key"
            fits "$server" "$SC_KIND" || continue
            if [[ $key == slow ]]; then
                run_slow "$server" "$round"
            else
                run_load "$server" "$key" "$round"
            fi
        done
    done
done
if ((IDLE)); then
    for ((round = 1; round <= ROUNDS; round++)); do
        for server in "${server_list[@]}"; do
            fits "$server" idle || continue
            run_idle "$server" "$round"
            # The same with permessage-deflate agreed on every connection.
            if ((NEED_DEFLATE)) && [[ $server == wsd-* || $server == base-* ]]; then
                run_idle "$server+deflate" "$round"
            fi
        done
    done
fi
log "all runs done in $((SECONDS - start)) s"
machine_json_end "$OUT/logs/machine.json"

echo
python3 loadtest/report.py summarize --runs "$RUNS" --out "$OUT" --command "$COMMAND" \
    --machine-json "$OUT/logs/machine.json"
