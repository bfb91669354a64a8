#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient against the tokio or hyper adapter and judges
# the report with autobahn/check.py (every case OK/INFORMATIONAL: no NON-STRICT, no
# FAILED, no UNIMPLEMENTED).
#
#   autobahn/run-adapter.sh --adapter tokio|stream|stream-next|hyper|hyper-stream|axum [--full|--sample|--core|--cases '1.*,2.*']
#
# The full suite (517 cases, permessage-deflate on in the testee) by default; --core runs
# sections 1-10 (301 cases), --sample those and 86 of the deflate cases (387; the lists are
# in autobahn/scopes.sh). Prints the run's wall time.
#
# tokio:        examples/echo_tokio.rs --api split (websocket_driver::tokio::accept over
#               TcpStream: the connection task and the cloneable-sender API).
# stream:       examples/echo_tokio.rs --api recv (WebSocketStream::accept, polled inline;
#               events lent from the read buffer, answers queued on the Reply).
# stream-next:  examples/echo_tokio.rs --api next (the same with owned events and
#               send_message).
# hyper:        examples/echo_hyper.rs --api split (a hyper 1.x http1 server upgrading with
#               websocket_driver::hyper::serve, the split API).
# hyper-stream: examples/echo_hyper.rs --api recv (hyper::serve_stream, inline).
# axum:         examples/echo_axum.rs (an axum Router, the WebSocketUpgrade extractor and
#               the axum-shaped WebSocket).
# Same fuzzingclient config as autobahn/run.sh (autobahn/fuzzingclient.json). Installs the
# suite into $AUTOBAHN_HOME (default /opt/autobahn) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

adapter=""
. autobahn/scopes.sh
scope_cases full
while [ $# -gt 0 ]; do
  case "$1" in
    --adapter) adapter=$2; shift 2 ;;
    --cases) cases=$2; expect=""; scope=cases; shift 2 ;;
    --core|--sample|--full) scope_cases "${1#--}"; shift ;;
    *) echo "usage: autobahn/run-adapter.sh --adapter tokio|stream|stream-next|hyper|hyper-stream|axum [--full|--sample|--core|--cases LIST]" >&2; exit 2 ;;
  esac
done
started=$(date +%s)
case "$adapter" in
  tokio) example=echo_tokio; features=tokio; default_port=9101; args=(--api split) ;;
  hyper) example=echo_hyper; features=hyper; default_port=9102; args=(--api split) ;;
  stream) example=echo_tokio; features=tokio; default_port=9103; args=(--api recv) ;;
  stream-next) example=echo_tokio; features=tokio; default_port=9106; args=(--api next) ;;
  hyper-stream) example=echo_hyper; features=hyper; default_port=9104; args=(--api recv) ;;
  axum) example=echo_axum; features=hyper; default_port=9105; args=() ;;
  *) echo "usage: autobahn/run-adapter.sh --adapter tokio|stream|stream-next|hyper|hyper-stream|axum [--full|--sample|--core|--cases LIST]" >&2; exit 2 ;;
esac

AUTOBAHN_HOME=${AUTOBAHN_HOME:-/opt/autobahn}
export AUTOBAHN_HOME
if ! "$AUTOBAHN_HOME/bin/wstest" --help >/dev/null 2>&1; then
  bash autobahn/install.sh
fi

port=${AUTOBAHN_PORT:-$default_port}
cargo build --release --features "$features" --example "$example"
"./target/release/examples/$example" --addr "127.0.0.1:$port" --deflate "${args[@]}" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

work=$(mktemp -d)
outdir="autobahn/reports/server-adapter-$adapter"
rm -rf "$outdir"
python3 - "$work/config.json" "$outdir" "$port" "$adapter" "$cases" <<'PY'
import json, sys
path, outdir, port, adapter, cases = sys.argv[1:]
config = json.load(open("autobahn/fuzzingclient.json"))
config["outdir"] = outdir
config["servers"] = [{"agent": "websocket-driver-" + adapter, "url": "ws://127.0.0.1:%s" % port}]
if cases:
    config["cases"] = cases.split(",")
json.dump(config, open(path, "w"))
PY
"$AUTOBAHN_HOME/bin/wstest" -m fuzzingclient -s "$work/config.json" > "$work/wstest.log" 2>&1 || {
  tail -20 "$work/wstest.log"; exit 1; }
status=0
# The counts are kept per runtime and scope (full, sample, core, cases) in autobahn/results/.
record="autobahn/results/$(basename "$outdir").$scope.txt"
python3 autobahn/check.py "$outdir" ${expect:+--expect "$expect"} --record "$record" || status=$?
echo "autobahn: $outdir: $(( $(date +%s) - started )) s wall time"
echo "wall time: $(( $(date +%s) - started )) s; $(date -u "+%F %H:%M") UTC; commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >> "$record"
exit $status
