#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzingclient against the echo example and judges the report.
#
#   autobahn/run.sh [--backend epoll|blocking] [--threads N] [--cases '1.*,2.*']
#
# Installs the suite into $AUTOBAHN_HOME (default /opt/autobahn) when it is missing, the way
# ../shared/autobahn/install.sh does (autobahn/install.sh is a copy of it). Exits non-zero
# on any case that is not OK/INFORMATIONAL in sections 1-10 (NON-STRICT counts as failing)
# or not UNIMPLEMENTED in 12-13.
set -euo pipefail
cd "$(dirname "$0")/.."

backend=epoll
threads=2
cases=""
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --cases) cases=$2; shift 2 ;;
    *) echo "usage: autobahn/run.sh [--backend B] [--threads N] [--cases LIST]" >&2; exit 2 ;;
  esac
done

AUTOBAHN_HOME=${AUTOBAHN_HOME:-/opt/autobahn}
export AUTOBAHN_HOME
if ! "$AUTOBAHN_HOME/bin/wstest" --help >/dev/null 2>&1; then
  bash autobahn/install.sh
fi

port=${AUTOBAHN_PORT:-9001}
cargo build --release --example echo
./target/release/examples/echo --addr "127.0.0.1:$port" --backend "$backend" --threads "$threads" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

work=$(mktemp -d)
outdir="autobahn/reports/server-$backend"
rm -rf "$outdir"
python3 - "$work/config.json" "$outdir" "$port" "$backend" "$cases" <<'PY'
import json, sys
path, outdir, port, backend, cases = sys.argv[1:]
config = json.load(open("autobahn/fuzzingclient.json"))
config["outdir"] = outdir
config["servers"] = [{"agent": "websocket-driver-" + backend, "url": "ws://127.0.0.1:%s" % port}]
if cases:
    config["cases"] = cases.split(",")
json.dump(config, open(path, "w"))
PY
"$AUTOBAHN_HOME/bin/wstest" -m fuzzingclient -s "$work/config.json" > "$work/wstest.log" 2>&1 || {
  tail -20 "$work/wstest.log"; exit 1; }
if [ -n "$cases" ]; then
  python3 autobahn/check.py "$outdir" || true   # a partial run cannot reach 301 cases
else
  python3 autobahn/check.py "$outdir"
fi
