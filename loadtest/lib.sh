# Shell helpers shared by loadtest/compare.sh, crossnode.sh and scaling.sh (sourced; each
# script defines its own `log`). Process CPU from /proc, wsload's progress sampling, ports,
# stopping what a script started.

proc_ticks() { # /proc path of a process or thread -> utime + stime in clock ticks (-1 if gone)
    local stat f
    # 2>/dev/null first: redirections apply in order, and a gone process fails the `<`.
    read -r stat 2>/dev/null <"$1/stat" || { echo -1; return; }
    stat=${stat##*) } # the command name may hold spaces; fields resume after ") "
    read -ra f <<<"$stat"
    echo $((f[11] + f[12])) # utime (field 14) and stime (field 15)
}

cpu_ticks() { # pid -> utime + stime of the whole process, in clock ticks (-1 if gone)
    proc_ticks "/proc/$1"
}

cpu_ticks_split() { # pid -> "TOTAL:USER" clock ticks (utime + stime, and utime alone; -1 if gone)
    local stat f
    read -r stat 2>/dev/null <"/proc/$1/stat" || { echo -1; return; }
    stat=${stat##*) }
    read -ra f <<<"$stat"
    echo "$((f[11] + f[12])):${f[11]}"
}

# `times` must run in the calling shell (not in a $(...) subshell, whose children are its
# own): its second line is the user and system time of every child the shell has reaped,
# which is how wsload's CPU time is taken.
children_cpu_s() { # file from `times >file` -> user + system seconds of reaped children
    python3 -c '
import re, sys
line = open(sys.argv[1]).read().splitlines()[-1]  # "0m1.234s 0m0.567s"
print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line)))' "$1"
}

# Stamps each wsload progress line with the wall clock and the server's CPU ticks, total
# and user (the format loadtest/report.py record reads).
sample_progress() { # pid samples-file log-file
    local line
    while IFS= read -r line; do
        if [[ $line == wsload:*msgs/s* ]]; then
            printf '%s %s %s\n' "$EPOCHREALTIME" "$(cpu_ticks_split "$1")" "$line" >>"$2"
        fi
        printf '%s\n' "$line" >>"$3"
    done
}

listening() { # port: a LISTEN socket on 127.0.0.1:port (or any address), without connecting
    local hex
    hex=$(printf '%04X' "$1")
    grep -qE "^ *[0-9]+: (0100007F|00000000):$hex 00000000:0000 0A" /proc/net/tcp 2>/dev/null
}

await_listening() { # port pid: waits (up to 10 s) until the server listens; fails if it exits first
    local i
    for ((i = 0; i < 200; i++)); do
        listening "$1" && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

stop_pid() { # pid: SIGTERM, SIGKILL after 5 s
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid ignored SIGTERM for 5 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# The machine facts every result carries (date, CPUs, kernel, memory, load, rustc, commit),
# then the script's own as KEY VALUE pairs (a VALUE that parses as JSON, like 3 or true,
# is stored as such). Written to FILE as JSON.
machine_json() { # file [key value]...
    local file=$1
    shift
    python3 - "$file" \
        "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
        "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)" \
        "$(uname -sr)" "$(free -h 2>/dev/null | awk '/^Mem:/{print $2}')" \
        "$(cut -d' ' -f1-3 /proc/loadavg)" "$(rustc --version 2>/dev/null || true)" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty tree)')" \
        "$@" <<'PY'
import json, sys
path, *args = sys.argv[1:]
keys = ["date", "nproc", "cpu", "kernel", "memory", "loadavg at start", "rustc", "commit"]
facts = dict(zip(keys, args[:len(keys)]))
facts["nproc"] = int(facts["nproc"])
facts["cpu"] = facts["cpu"] or "unknown"
extra = args[len(keys):]
for key, value in zip(extra[0::2], extra[1::2]):
    try:
        facts[key] = json.loads(value)
    except ValueError:
        facts[key] = value
json.dump(facts, open(path, "w"), indent=1)
PY
}

machine_json_end() { # file: adds the load average at the end of the runs
    python3 - "$1" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["loadavg at end"] = sys.argv[2]
json.dump(m, open(sys.argv[1], "w"), indent=1)
PY
}

# The binaries the load scripts run: release builds under CARGO_TARGET_DIR (default
# target/, and loadtest/peers/target/ for the peers).
binaries() {
    TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
    PEERS_TARGET=${CARGO_TARGET_DIR:-$ROOT/loadtest/peers/target}
    WSLOAD=$TARGET/release/wsload
    ECHO=$TARGET/release/examples/echo
    PUBSUB_EXAMPLE=${PUBSUB_EXAMPLE:-pubsub}
    PUBSUB=$TARGET/release/examples/$PUBSUB_EXAMPLE
    ECHO_TOKIO=$TARGET/release/examples/echo_tokio
    ECHO_HYPER=$TARGET/release/examples/echo_hyper
    TUNGSTENITE=$PEERS_TARGET/release/tungstenite-echo
    FASTWS=$PEERS_TARGET/release/fastwebsockets-echo
    PS_TUNGSTENITE=$PEERS_TARGET/release/pubsub-tungstenite
    PS_FASTWS=$PEERS_TARGET/release/pubsub-fastwebsockets
}

server_cmd() { # name port [kind] -> the command line, as an array in SERVER_ARGV
    local addr=127.0.0.1:$2 wsd=$ECHO base=${BASELINE_ECHO:-} name=$1 extra=()
    if [[ ${3:-echo} == broadcast || ${3:-echo} == fanout ]]; then
        wsd=$PUBSUB base=${BASELINE_PUBSUB:-}
    fi
    # permessage-deflate on: the deflate scenario, and the idle runs of "NAME+deflate".
    if [[ ${3:-echo} == deflate || $name == *+deflate ]]; then
        extra=(--deflate) name=${name%+deflate}
    fi
    case "$name" in
        wsd-epoll) SERVER_ARGV=("$wsd" --addr "$addr" --backend epoll --threads 1 "${extra[@]}") ;;
        wsd-io-uring) SERVER_ARGV=("$wsd" --addr "$addr" --backend io-uring --threads 1 "${extra[@]}") ;;
        # An earlier build of the echo example (BASELINE_ECHO=path) or of the pub/sub one
        # (BASELINE_PUBSUB=path), for before/after runs.
        base-epoll) SERVER_ARGV=("${base:?set BASELINE_ECHO / BASELINE_PUBSUB}" --addr "$addr" --backend epoll --threads 1 "${extra[@]}") ;;
        base-io-uring) SERVER_ARGV=("${base:?set BASELINE_ECHO / BASELINE_PUBSUB}" --addr "$addr" --backend io-uring --threads 1 "${extra[@]}") ;;
        node-ws) SERVER_ARGV=(node "$ROOT/interop/node_peer.js" server "$2") ;;
        tokio-tungstenite) SERVER_ARGV=("$TUNGSTENITE" --addr "$addr" --threads 1) ;;
        fastwebsockets) SERVER_ARGV=("$FASTWS" --addr "$addr" --threads 1) ;;
        echo_tokio) SERVER_ARGV=("$ECHO_TOKIO" --addr "$addr" --threads 1) ;;
        echo_hyper) SERVER_ARGV=("$ECHO_HYPER" --addr "$addr" --threads 1) ;;
        pubsub-tungstenite) SERVER_ARGV=("$PS_TUNGSTENITE" --addr "$addr" --threads 1) ;;
        pubsub-fastwebsockets) SERVER_ARGV=("$PS_FASTWS" --addr "$addr" --threads 1) ;;
        *) return 1 ;;
    esac
}

check_servers() { # comma-separated names -> server_list (an array); exits 2 on an unknown one
    IFS=, read -ra server_list <<<"$1"
    local s
    for s in "${server_list[@]}"; do
        server_cmd "$s" 1 || { echo "unknown server: $s" >&2; exit 2; }
    done
}

build_echo_servers() { # wsload, the echo examples and the peers, in release
    log "building in release: wsload, the echo examples, the peers"
    cargo build --release -p wsload >&2
    cargo build --release --features hyper --example echo --example echo_tokio --example echo_hyper >&2
    (cd loadtest/peers && cargo build --release) >&2
}
