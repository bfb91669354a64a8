#!/usr/bin/env bash
# Cross-node pub/sub fan-out through the Redis backplane: two examples/pubsub processes (A
# and B, built with --features redis) joined by one redis-server of this script's own, driven
# by wsload fanout.
#
#   loadtest/crossnode.sh [--subs N] [--rates 20,200] [--secs S] [--rounds R]
#                         [--sweep-rates 1000,5000,20000,50000,100000,200000,300000,500000]
#                         [--sweep-subs 20,2] [--sweep-max-offered 2000000] [--sweep-secs S]
#                         [--no-sweep] [--backend epoll|io-uring]
#                         [--quick] [--no-build] [--out DIR]
#
# (a) single: one publisher and --subs (1000) subscribers, all on node A;
# (b) cross:  one publisher on A, the subscribers split round-robin, half on A (local) and
#     half on B (remote: A -> Redis -> B);
# each at every rate of --rates (publishes/s, 16 B each), --rounds (3) rounds of --secs
# (5) s, interleaved a b a b; medians over rounds.
# (c) sweep: cross-node with --sweep-subs subscribers (20: 10 per node, then 2: one per node,
#     where wsload's own core is less of a limit) at each of --sweep-rates publishes/s for
#     --sweep-secs (3) s each, leaving out the rates whose deliveries/s offered (rate x subs)
#     pass --sweep-max-offered (2 000 000: more than wsload's one core receives): how many
#     publishes/s one Redis carries across the two nodes before p99 explodes or deliveries
#     go missing. A rate counts as carried when at least 95% of it was published, nothing
#     went missing or was dropped by the backplane, and the remote p99 stayed under 10 ms.
#
# wsload waits 0.5 s (--settle-secs) between the last connection opening and the first
# publish: B subscribes to Redis asynchronously, and the warm-up's first messages could
# otherwise beat its SUBSCRIBE (counted as missing).
#
# Every run starts A and B afresh (--threads 1, the same --backend) on fresh ports; Redis
# (--save '' --appendonly no, on a free loopback port) runs for the whole script. Reported
# per run: deliveries/s, p50/p99/p99.9 publish -> delivery, missing deliveries (overall, and
# for the local and remote halves apart), Redis commands/s (the delta of
# total_commands_processed over the measuring window: the PUBLISHes A pipelines), the CPU
# share of one core of A, B, their backplane threads (wsd-redis-pub / wsd-redis-sub), Redis,
# and of each pinned CPU as a whole (/proc/stat, whoever used it), and the nodes' GET /stats.
#
# Pinning (taskset, when installed): A, B and Redis on SERVER_CPU (0), wsload on CLIENT_CPU
# (1); A_CPU, B_CPU, REDIS_CPU override each. Results: DIR (loadtest/results/crossnode)
# /runs.jsonl (every run), crossnode.json (medians), results.md (tables, also on stdout);
# logs in DIR/logs (not committed). All traffic is to 127.0.0.1; every step is bounded in
# time; everything started here is killed on exit. See loadtest/README.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COMMAND="loadtest/crossnode.sh${*:+ $*}"

SUBS=1000
RATES="20,200"
SECS=5
ROUNDS=3
SWEEP_RATES="1000,5000,20000,50000,100000,200000,300000,500000"
SWEEP_MAX_OFFERED=2000000
SWEEP_SUBS="20,2"
SWEEP_SECS=3
SWEEP=1
BACKEND=epoll
BUILD=1
OUT="$ROOT/loadtest/results/crossnode"
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
A_CPU=${A_CPU:-$SERVER_CPU}
B_CPU=${B_CPU:-$SERVER_CPU}
REDIS_CPU=${REDIS_CPU:-$SERVER_CPU}
PORT_BASE=${PORT_BASE:-19600}
TOPIC=/bench

usage() {
    sed -n '2,41p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}
while (($#)); do
    case "$1" in
        --subs) SUBS=${2:?}; shift ;;
        --rates) RATES=${2:?}; shift ;;
        --secs) SECS=${2:?}; shift ;;
        --rounds) ROUNDS=${2:?}; shift ;;
        --sweep-rates) SWEEP_RATES=${2:?}; shift ;;
        --sweep-subs) SWEEP_SUBS=${2:?}; shift ;;
        --sweep-max-offered) SWEEP_MAX_OFFERED=${2:?}; shift ;;
        --sweep-secs) SWEEP_SECS=${2:?}; shift ;;
        --no-sweep) SWEEP=0 ;;
        --backend) BACKEND=${2:?}; shift ;;
        --quick) ROUNDS=1 SECS=2 SWEEP_SECS=2 SWEEP_RATES=1000,20000 ;;
        --no-build) BUILD=0 ;;
        --out) OUT=${2:?}; shift ;;
        -h | --help) usage 0 ;;
        *) echo "crossnode.sh: unknown argument $1" >&2; usage 2 ;;
    esac
    shift
done
[[ $SUBS =~ ^[1-9][0-9]*$ ]] || { echo "crossnode.sh: --subs needs a positive integer" >&2; exit 2; }
[[ $SWEEP_SUBS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "crossnode.sh: --sweep-subs needs positive integers, comma-separated" >&2; exit 2; }
[[ $SWEEP_MAX_OFFERED =~ ^[1-9][0-9]*$ ]] || { echo "crossnode.sh: --sweep-max-offered needs a positive integer" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "crossnode.sh: --rounds needs a positive integer" >&2; exit 2; }
[[ $SECS =~ ^[0-9]+(\.[0-9]+)?$ && $SWEEP_SECS =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    { echo "crossnode.sh: --secs / --sweep-secs need a number" >&2; exit 2; }
[[ $RATES =~ ^[0-9.]+(,[0-9.]+)*$ && $SWEEP_RATES =~ ^[0-9.]+(,[0-9.]+)*$ ]] ||
    { echo "crossnode.sh: --rates / --sweep-rates need numbers, comma-separated" >&2; exit 2; }
[[ $BACKEND == epoll || $BACKEND == io-uring ]] || { echo "crossnode.sh: --backend epoll|io-uring" >&2; exit 2; }
IFS=, read -ra rate_list <<<"$RATES"
IFS=, read -ra sweep_list <<<"$SWEEP_RATES"
IFS=, read -ra sweep_subs_list <<<"$SWEEP_SUBS"

log() { printf '[crossnode %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
die() { log "error: $*"; exit 1; }

for tool in timeout python3 cargo getconf curl redis-server redis-cli; do
    command -v "$tool" >/dev/null || die "$tool not found"
done
pin() { # cpu -> the taskset prefix (none without taskset)
    if command -v taskset >/dev/null; then
        echo "taskset -c $1"
    fi
}
read -ra PIN_A <<<"$(pin "$A_CPU")"
read -ra PIN_B <<<"$(pin "$B_CPU")"
read -ra PIN_REDIS <<<"$(pin "$REDIS_CPU")"
read -ra PIN_CLIENT <<<"$(pin "$CLIENT_CPU")"
command -v taskset >/dev/null || log "taskset not found: nothing is pinned"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WSLOAD=$TARGET/release/wsload
PUBSUB=$TARGET/release/examples/pubsub
if ((BUILD)); then
    log "building in release: wsload, examples/pubsub with --features redis"
    cargo build --release -p wsload || die "cargo build -p wsload failed"
    cargo build --release -p websocket-driver --features redis --example pubsub ||
        die "cargo build --features redis --example pubsub failed"
fi
for bin in "$WSLOAD" "$PUBSUB"; do
    [[ -x $bin ]] || die "$bin missing (run without --no-build)"
done

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < SUBS + 100)); then
    log "open-files limit $(ulimit -n) < $SUBS + 100: not every subscriber may connect"
fi
CLK_TCK=$(getconf CLK_TCK)
load1=$(cut -d' ' -f1 /proc/loadavg)
if python3 -c "import sys; sys.exit(0 if $load1 > 0.5 else 1)"; then
    log "warning: load average $load1 before starting: other work on this machine will skew the numbers"
fi
mkdir -p "$OUT/logs"
RUNS=$OUT/runs.jsonl
: >"$RUNS"

# ----- processes (every one started here is killed on exit) -----
REDIS_PID="" A_PID="" B_PID="" TMP=""
cleanup() {
    stop_pid "$A_PID"
    stop_pid "$B_PID"
    stop_pid "$REDIS_PID"
    A_PID="" B_PID="" REDIS_PID=""
    [[ -z $TMP ]] || rm -rf "$TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
TMP=$(mktemp -d "${TMPDIR:-/tmp}/wsd-crossnode.XXXXXX")
# Private copies: a build elsewhere (compare.sh builds examples/pubsub without the redis
# feature) must not swap the binaries in the middle of the runs.
cp "$WSLOAD" "$TMP/wsload"
cp "$PUBSUB" "$TMP/pubsub"
WSLOAD=$TMP/wsload PUBSUB=$TMP/pubsub

PORT=$PORT_BASE
free_port() { # -> PORT: the next port nobody listens on
    PORT=$((PORT + 1))
    while listening "$PORT"; do PORT=$((PORT + 1)); done
}
wait_listening() { # pid port name logfile
    local i
    for ((i = 0; i < 100; i++)); do # up to 10 s
        listening "$2" && return 0
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    die "$3 did not start listening on 127.0.0.1:$2 (see $4)"
}

free_port
REDIS_PORT=$PORT
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
"${PIN_REDIS[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --protected-mode yes >"$OUT/logs/redis.log" 2>&1 &
REDIS_PID=$!
wait_listening "$REDIS_PID" "$REDIS_PORT" redis-server "$OUT/logs/redis.log"
rcli() { timeout 5 redis-cli -p "$REDIS_PORT" "$@"; }
[[ $(rcli ping) == PONG ]] || die "redis-server on port $REDIS_PORT does not answer PING"
log "redis-server $(redis-server --version | grep -o 'v=[^ ]*') on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"

start_node() { # name cpu-prefix-var -> sets NODE_PID, NODE_PORT
    local name=$1 logfile=$OUT/logs/$2.log
    local -n pinning=$3
    free_port
    NODE_PORT=$PORT
    "${pinning[@]}" "$PUBSUB" --addr "127.0.0.1:$NODE_PORT" --backend "$BACKEND" --threads 1 \
        --redis "$REDIS_URL" >"$logfile" 2>&1 &
    NODE_PID=$!
    wait_listening "$NODE_PID" "$NODE_PORT" "node $name" "$logfile"
}

thread_ticks() { # pid thread-name -> the ticks of that thread (-1 if none)
    local task comm
    for task in /proc/"$1"/task/*; do
        read -r comm <"$task/comm" 2>/dev/null || continue
        if [[ $comm == "$2" ]]; then
            proc_ticks "$task"
            return
        fi
    done
    echo -1
}
core_ticks() { # cpu -> "busy total" ticks of that CPU from /proc/stat
    local name user nice sys idle iowait irq softirq steal rest
    while read -r name user nice sys idle iowait irq softirq steal rest; do
        if [[ $name == "cpu$1" ]]; then
            echo "$((user + nice + sys + irq + softirq + steal)) $((user + nice + sys + idle + iowait + irq + softirq + steal))"
            return
        fi
    done </proc/stat
    echo "0 0"
}
redis_commands() {
    rcli info stats 2>/dev/null | tr -d '\r' | sed -n 's/^total_commands_processed://p' || echo -1
}
snapshot() { # -> one line: time, ticks of A, B, their backplane threads, Redis, CPUs, Redis commands
    printf '%s %s %s %s %s %s %s %s %s %s %s\n' "$EPOCHREALTIME" \
        "$(cpu_ticks "$A_PID")" "$(cpu_ticks "$B_PID")" \
        "$(thread_ticks "$A_PID" wsd-redis-pub)" "$(thread_ticks "$A_PID" wsd-redis-sub)" \
        "$(thread_ticks "$B_PID" wsd-redis-sub)" "$(cpu_ticks "$REDIS_PID")" \
        "$(core_ticks "$SERVER_CPU")" "$(core_ticks "$CLIENT_CPU")" "$(redis_commands)"
}
# A snapshot at every progress line wsload prints (one a second in the measuring window).
sample_progress() { # samples-file log-file
    local line
    while IFS= read -r line; do
        if [[ $line == wsload:*msgs/s* ]]; then
            snapshot >>"$1"
        fi
        printf '%s\n' "$line" >>"$2"
    done
}

# ----- one run -----
run() { # scenario(single|cross|sweep) rate subs secs round
    local scenario=$1 rate=$2 subs=$3 secs=$4 round=$5 tag out samples limit rc sub_urls=()
    tag="$scenario-r$rate-s$subs-$round"
    out=$TMP/$tag.json samples=$TMP/$tag.samples
    : >"$samples"
    start_node A "$tag.A" PIN_A
    A_PID=$NODE_PID A_PORT=$NODE_PORT
    start_node B "$tag.B" PIN_B
    B_PID=$NODE_PID B_PORT=$NODE_PORT
    if [[ $scenario != single ]]; then
        sub_urls=(--sub-url "ws://127.0.0.1:$A_PORT$TOPIC" --sub-url "ws://127.0.0.1:$B_PORT$TOPIC")
    fi
    log "$scenario: $subs subscribers, $rate publishes/s, ${secs} s, round $round: A :$A_PORT, B :$B_PORT"
    # Connecting, settling, the warm-up second, the window, the drain (10 s at most), closing.
    limit=$(python3 -c "print(int($secs) + 90)")
    set +e
    timeout -k 5 "$limit" "${PIN_CLIENT[@]}" "$WSLOAD" fanout --url "ws://127.0.0.1:$A_PORT$TOPIC" \
        "${sub_urls[@]}" --subs "$subs" --rate "$rate" --secs "$secs" --drain-secs 10 --settle-secs 0.5 \
        2>&1 >"$out" | sample_progress "$samples" "$OUT/logs/$tag.wsload.log"
    rc=${PIPESTATUS[0]}
    set -e
    curl -s --max-time 2 "http://127.0.0.1:$A_PORT/stats" >"$TMP/$tag.A.stats" || echo '{}' >"$TMP/$tag.A.stats"
    curl -s --max-time 2 "http://127.0.0.1:$B_PORT/stats" >"$TMP/$tag.B.stats" || echo '{}' >"$TMP/$tag.B.stats"
    stop_pid "$A_PID"
    stop_pid "$B_PID"
    A_PID="" B_PID=""
    python3 - "$scenario" "$rate" "$subs" "$secs" "$round" "$rc" "$out" "$samples" \
        "$TMP/$tag.A.stats" "$TMP/$tag.B.stats" "$CLK_TCK" >>"$RUNS" <<'EOF'
import json, sys
scenario, rate, subs, secs, rnd, rc, out, samples, sa, sb, clk = sys.argv[1:]
def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {}
rec = {"scenario": scenario, "rate": float(rate), "subs": int(subs), "secs": float(secs),
       "round": int(rnd), "rc": int(rc), "wsload": load(out),
       "stats_a": load(sa), "stats_b": load(sb)}
rows = [l.split() for l in open(samples) if l.strip()]
if len(rows) >= 2:
    (t0, *x0), (t1, *x1) = rows[0], rows[-1]
    dt = float(t1) - float(t0)
    clk = float(clk)
    share = lambda i: None if "-1" in (x0[i], x1[i]) else round((int(x1[i]) - int(x0[i])) / clk / dt, 3)
    names = ["node_a", "node_b", "a_redis_pub", "a_redis_sub", "b_redis_sub", "redis"]
    rec["window_s"] = round(dt, 3)
    rec["cpu"] = {n: share(i) for i, n in enumerate(names)}
    for k, cpu in ((6, "server_cpu"), (8, "client_cpu")):
        busy, total = int(x1[k]) - int(x0[k]), int(x1[k + 1]) - int(x0[k + 1])
        rec["cpu"][cpu] = round(busy / total, 3) if total > 0 else None
    rec["redis_cmds_per_sec"] = round((int(x1[10]) - int(x0[10])) / dt, 1) if int(x0[10]) >= 0 else None
print(json.dumps(rec))
EOF
    tail -n 1 "$RUNS" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read()); w = r["wsload"]; c = r.get("cpu", {})
def part(x):
    return "%s/s p50 %s p99 %s us, %s missing" % (format(x.get("deliveries_per_sec", 0), ",.0f"),
        x.get("p50_us", "-"), x.get("p99_us", "-"), x.get("missing", "-"))
pu = w.get("per_url", [])
print("    all: " + part(w) + (", errors %s" % w.get("errors")) + ("  rc %d" % r["rc"] if r["rc"] else ""))
if r["scenario"] != "single" and len(pu) == 2:
    print("    local (A): " + part(pu[0]) + "\n    remote (B): " + part(pu[1]))
print("    redis %s cmds/s; CPU A %s (pub thread %s), B %s (sub thread %s), redis %s, server CPU %s, client CPU %s; A backplane dropped %s" % (
    r.get("redis_cmds_per_sec"), c.get("node_a"), c.get("a_redis_pub"), c.get("node_b"),
    c.get("b_redis_sub"), c.get("redis"), c.get("server_cpu"), c.get("client_cpu"),
    r["stats_a"].get("backplane_dropped")))' >&2
}

# ----- machine info -----
pinned=""
command -v taskset >/dev/null || pinned=" (no taskset: not pinned)"
machine_json "$OUT/logs/machine.json" \
    redis "$(redis-server --version)" \
    pinning "A: cpu $A_CPU, B: cpu $B_CPU, redis: cpu $REDIS_CPU, wsload: cpu $CLIENT_CPU$pinned" \
    backend "$BACKEND"

start=$SECONDS
for rate in "${rate_list[@]}"; do
    for ((round = 1; round <= ROUNDS; round++)); do
        run single "$rate" "$SUBS" "$SECS" "$round"
        run cross "$rate" "$SUBS" "$SECS" "$round"
    done
done
if ((SWEEP)); then
    for subs in "${sweep_subs_list[@]}"; do
        for rate in "${sweep_list[@]}"; do
            if python3 -c "import sys; sys.exit(0 if $rate * $subs > $SWEEP_MAX_OFFERED else 1)"; then
                log "sweep: $subs subscribers at $rate publishes/s offer more than $SWEEP_MAX_OFFERED deliveries/s: left out"
                continue
            fi
            run sweep "$rate" "$subs" "$SWEEP_SECS" 1
        done
    done
fi
log "all runs done in $((SECONDS - start)) s"

python3 - "$RUNS" "$OUT" "$COMMAND" "$OUT/logs/machine.json" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'EOF'
import json, statistics, sys
runs_path, out, command, machine_path, load_end = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
machine = json.load(open(machine_path))
machine["loadavg at end"] = load_end

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def part(ws, runs):
    return {
        "deliveries_per_sec": med([w.get("deliveries_per_sec") for w in ws]),
        "p50_us": med([w.get("p50_us") for w in ws]),
        "p99_us": med([w.get("p99_us") for w in ws]),
        "p999_us": med([w.get("p999_us") for w in ws]),
        "missing": sum(w.get("missing", 0) for w in ws),
        "per_round_deliveries_per_sec": [w.get("deliveries_per_sec") for w in ws],
    }

def summary(group):
    ws = [r["wsload"] for r in group]
    s = {"scenario": group[0]["scenario"], "rate": group[0]["rate"], "subs": group[0]["subs"],
         "rounds": len(group), "failed_runs": sum(1 for r in group if r["rc"] or not r["wsload"]),
         "all": part(ws, group),
         "errors": sum(w.get("errors", 0) for w in ws),
         "published_per_sec": med([w["measured_published"] / w["secs"] for w in ws if w.get("secs")]),
         "redis_cmds_per_sec": med([r.get("redis_cmds_per_sec") for r in group]),
         "backplane_dropped": sum(r["stats_a"].get("backplane_dropped", 0) + r["stats_b"].get("backplane_dropped", 0) for r in group),
         "cpu": {k: med([r.get("cpu", {}).get(k) for r in group]) for k in
                 ("node_a", "a_redis_pub", "a_redis_sub", "node_b", "b_redis_sub", "redis", "server_cpu", "client_cpu")}}
    if s["scenario"] != "single":
        s["local"] = part([w["per_url"][0] for w in ws if len(w.get("per_url", [])) == 2], group)
        s["remote"] = part([w["per_url"][1] for w in ws if len(w.get("per_url", [])) == 2], group)
    return s

keys = []
for r in runs:
    k = (r["scenario"], r["rate"], r["subs"])
    if k not in keys:
        keys.append(k)
summaries = [summary([r for r in runs if (r["scenario"], r["rate"], r["subs"]) == k]) for k in keys]
json.dump({"command": command, "machine": machine, "results": summaries},
          open(out + "/crossnode.json", "w"), indent=1)

f = lambda x, d=0: "-" if x is None else format(x, ",.%df" % d)
pct = lambda x: "-" if x is None else "%d%%" % round(100 * x)
lines = ["# Cross-node pub/sub fan-out through the Redis backplane", "",
         "`%s`" % command, "",
         "%s; %s; %s CPUs (%s); %s; load average %s at start, %s at end; commit %s; pinning: %s; backend %s." % (
             machine["date"], machine["kernel"], machine["nproc"], machine["cpu"], machine["redis"],
             machine["loadavg at start"], load_end, machine["commit"], machine["pinning"], machine["backend"]),
         "", "## Single node vs cross-node (medians over rounds; missing summed)", "",
         "| scenario | subs | publishes/s | achieved | part | deliveries/s | p50 µs | p99 µs | p99.9 µs | missing | Redis cmds/s | CPU A | CPU B | CPU Redis | server CPU | client CPU |",
         "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for s in summaries:
    if s["scenario"] == "sweep":
        continue
    parts = [("all", s["all"])] + ([("local (A)", s["local"]), ("remote (B)", s["remote"])] if "local" in s else [])
    for i, (name, p) in enumerate(parts):
        c = s["cpu"]
        tail = [f(s["redis_cmds_per_sec"]), pct(c["node_a"]), pct(c["node_b"]), pct(c["redis"]),
                pct(c["server_cpu"]), pct(c["client_cpu"])] if i == 0 else [""] * 6
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            s["scenario"] if i == 0 else "", f(s["subs"]) if i == 0 else "", f(s["rate"]) if i == 0 else "",
            f(s["published_per_sec"], 1) if i == 0 else "", name, f(p["deliveries_per_sec"]), f(p["p50_us"]), f(p["p99_us"]), f(p["p999_us"]),
            p["missing"], " | ".join(tail)))
sweep = [s for s in summaries if s["scenario"] == "sweep"]
def carried(s):
    r = s["remote"]
    return (s["published_per_sec"] is not None and s["published_per_sec"] >= 0.95 * s["rate"]
            and s["all"]["missing"] == 0 and s["backplane_dropped"] == 0 and s["failed_runs"] == 0
            and r["p99_us"] is not None and r["p99_us"] <= 10_000)
if sweep:
    lines += ["", "## Publish-rate sweep (cross-node, one run per rate)", "",
              "| subs | publishes/s offered | achieved | carried | Redis cmds/s | local p50 / p99 µs | remote p50 / p99 µs | remote deliveries/s | missing | backplane dropped | CPU A (pub thread) | CPU B (sub thread) | CPU Redis | server CPU | client CPU |",
              "|---:|---:|---:|---|---:|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    best = {}
    for s in sweep:
        c = s["cpu"]
        ok = carried(s)
        s["carried"] = ok
        if ok:
            best[s["subs"]] = max(best.get(s["subs"], 0), s["rate"])
        lines.append("| %s | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %s | %s (%s) | %s (%s) | %s | %s | %s |" % (
            s["subs"], f(s["rate"]), f(s["published_per_sec"]), "yes" if ok else "**no**", f(s["redis_cmds_per_sec"]),
            f(s["local"]["p50_us"]), f(s["local"]["p99_us"]), f(s["remote"]["p50_us"]), f(s["remote"]["p99_us"]),
            f(s["remote"]["deliveries_per_sec"]), s["all"]["missing"], s["backplane_dropped"],
            pct(c["node_a"]), pct(c["a_redis_pub"]), pct(c["node_b"]), pct(c["b_redis_sub"]), pct(c["redis"]),
            pct(c["server_cpu"]), pct(c["client_cpu"])))
    lines += [""] + ["Highest rate carried with %d subscribers: %s publishes/s." % (k, f(v)) for k, v in sorted(best.items())]
    json.dump({"command": command, "machine": machine, "results": summaries},
              open(out + "/crossnode.json", "w"), indent=1)
bad = [r for r in runs if r["rc"] or not r["wsload"]]
if bad:
    lines += ["", "Failed runs (left in the medians where they produced JSON): " +
              ", ".join("%s %s/s round %s (rc %s)" % (r["scenario"], r["rate"], r["round"], r["rc"]) for r in bad)]
lines += ["", "CPU columns: share of one core in the measuring window (A, B: the whole process; pub/sub "
          "thread: its backplane threads; server / client CPU: the pinned cores as a whole, whoever used them)."]
text = "\n".join(lines) + "\n"
open(out + "/results.md", "w").write(text)
print(text)
EOF
