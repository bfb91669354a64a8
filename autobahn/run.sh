#!/usr/bin/env bash
# Runs the Autobahn|Testsuite against this project and judges the report.
#
#   autobahn/run.sh [--backend auto|epoll|io-uring|blocking] [--threads N]
#                   [--full|--sample|--core|--cases LIST]
#                   [--deflate-takeover]
#       server mode: wstest's fuzzingclient against examples/echo.rs --deflate
#   autobahn/run.sh client [--hosted] [--backend auto|epoll|io-uring] [--tokio recv|next|split]
#                          [--full|--sample|--core|--cases LIST]
#       client mode: wstest's fuzzingserver driven by examples/autobahn_client.rs --deflate
#       (BlockingClient; ClientReactor with --hosted; the tokio adapter's client with
#       --tokio: WebSocketStream with recv or next, or the split API)
#
# By default the full suite runs: all 517 cases, sections 12-13 (permessage-deflate)
# included, with deflate on in the testee. --core runs sections 1-10 only (301 cases);
# --sample sections 1-10 and 86 of the deflate cases (387, what .ci/run runs; the lists are
# in autobahn/scopes.sh); --cases a list of its own. --deflate-takeover serves with context
# takeover both ways instead of the default (none). Prints the run's wall time.
#
# Installs the suite into $AUTOBAHN_HOME (default /opt/autobahn) when it is missing, the way
# ../shared/autobahn/install.sh does (autobahn/install.sh is a copy of it). Exits non-zero
# on any case that is not OK/INFORMATIONAL with a clean close: NON-STRICT, FAILED and
# UNIMPLEMENTED all count as failing (autobahn/check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=server
if [ "${1:-}" = client ]; then mode=client; shift; fi
backend=auto
threads=2
. autobahn/scopes.sh
scope_cases full
hosted=""
tokio_api=""
deflate=--deflate
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --cases) cases=$2; expect=""; scope=cases; shift 2 ;;
    --core|--sample|--full) scope_cases "${1#--}"; shift ;;
    --deflate-takeover) deflate=--deflate-takeover; shift ;;
    --hosted) hosted=--hosted; shift ;;
    --tokio) tokio_api=$2; shift 2 ;;
    *) echo "usage: autobahn/run.sh [client] [--backend B] [--threads N] [--full|--sample|--core|--cases LIST] [--hosted] [--tokio recv|next|split] [--deflate-takeover]" >&2; exit 2 ;;
  esac
done
started=$(date +%s)

AUTOBAHN_HOME=${AUTOBAHN_HOME:-/opt/autobahn}
export AUTOBAHN_HOME
if ! "$AUTOBAHN_HOME/bin/wstest" --help >/dev/null 2>&1; then
  bash autobahn/install.sh
fi

port=${AUTOBAHN_PORT:-9001}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# wait_port PORT PID: waits until PORT accepts, failing if process PID (the one that should
# listen there) has exited: another process on the port must not be tested in its place.
wait_port() {
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "autobahn: the process for port $1 exited (port taken?)" >&2; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "autobahn: nothing listens on port $1" >&2; return 1
}
# Rewrites a checked-in config for this run: report directory, agent/url, case list.
configure() {  # template outdir agent
  python3 - "$1" "$work/config.json" "$2" "$3" "$port" "$cases" <<'PY'
import json, os, sys
template, path, outdir, agent, port, cases = sys.argv[1:]
config = json.load(open(template))
config["outdir"] = os.path.abspath(outdir)
if "servers" in config:
    config["servers"] = [{"agent": agent, "url": "ws://127.0.0.1:%s" % port}]
else:
    config["url"] = "ws://127.0.0.1:%s" % port
if cases:
    config["cases"] = cases.split(",")
json.dump(config, open(path, "w"))
PY
}
judge() {
  local status=0
  # The counts are kept per runtime and scope (full, sample, core, cases) in autobahn/results/.
  python3 autobahn/check.py "$1" ${expect:+--expect "$expect"} \
    --record "autobahn/results/$(basename "$1").$scope.txt" || status=$?
  echo "autobahn: $1: $(( $(date +%s) - started )) s wall time"
  echo "wall time: $(( $(date +%s) - started )) s; $(date -u "+%F %H:%M") UTC; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "autobahn/results/$(basename "$1").$scope.txt"
  return $status
}

if [ "$mode" = server ]; then
  cargo build --release --example echo
  ./target/release/examples/echo --addr "127.0.0.1:$port" --backend "$backend" --threads "$threads" $deflate &
  pids+=($!)
  wait_port "$port" "$!"
  outdir="autobahn/reports/server-$backend${deflate#--deflate}"
  rm -rf "$outdir"
  configure autobahn/fuzzingclient.json "$outdir" "websocket-driver-$backend"
  "$AUTOBAHN_HOME/bin/wstest" -m fuzzingclient -s "$work/config.json" > "$work/wstest.log" 2>&1 || {
    tail -20 "$work/wstest.log"; exit 1; }
  judge "$outdir"
else
  cargo build --release --example autobahn_client ${tokio_api:+--features tokio}
  flavour=${tokio_api:+tokio-$tokio_api}
  flavour=${flavour:-${hosted:+hosted-$backend}}
  flavour=${flavour:-blocking}
  agent="websocket-driver-client-$flavour"
  outdir="autobahn/reports/client-$flavour"
  rm -rf "$outdir"
  configure autobahn/fuzzingserver.json "$outdir" "$agent"
  (cd "$work" && exec "$AUTOBAHN_HOME/bin/wstest" -m fuzzingserver --webport 0 -s "$work/config.json" > "$work/wstest.log" 2>&1) &
  pids+=($!)
  wait_port "$port" "$!"
  ./target/release/examples/autobahn_client --url "ws://127.0.0.1:$port" --agent "$agent" $hosted \
    --backend "$backend" ${tokio_api:+--tokio "$tokio_api"} --deflate
  judge "$outdir"
fi
