#!/usr/bin/env bash
# permessage-deflate interop, both directions, against two other implementations:
# Python `websockets` and Node's `ws` (installed on first use into target/interop from
# PyPI and npm). Each pairing checks that deflate was agreed, that every message came back
# whole and that both directions were compressed on the wire.
#
#   interop/deflate.sh
#
#   their clients -> examples/echo.rs --deflate           (no context takeover, default)
#                 -> examples/echo.rs --deflate-takeover  (context takeover both ways)
#   examples/deflate_interop.rs [--takeover] -> their echo servers
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${INTEROP_HOME:-$PWD/target/interop}
retry() { local n; for n in 1 2 3; do "$@" && return 0; echo "retry $n: $*" >&2; sleep $((n * 5)); done; return 1; }
mkdir -p "$tools"
if ! "$tools/venv/bin/python" -c "import websockets" 2>/dev/null; then
  python3 -m venv "$tools/venv"
  retry "$tools/venv/bin/pip" install -q "websockets>=14,<18"
fi
if [ ! -f "$tools/node/node_modules/ws/package.json" ]; then
  mkdir -p "$tools/node"
  (cd "$tools/node" && retry npm install --silent --no-audit --no-fund ws@8)
fi
export WS_MODULE="$tools/node/node_modules/ws"
py="$tools/venv/bin/python"
echo "interop: websockets $("$py" -c 'import websockets; print(websockets.__version__)'), ws $(node -p "require('$WS_MODULE/package.json').version"), node $(node --version)"

cargo build --release --example echo --example deflate_interop
base=${INTEROP_PORT:-9401}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "interop: nothing listens on port $1" >&2; return 1
}
failed=0
check() {  # name command...
  local name=$1; shift
  if "$@"; then echo "interop: PASS $name"; else echo "interop: FAIL $name"; failed=$((failed + 1)); fi
}

# Their clients against our reactor server.
./target/release/examples/echo --addr "127.0.0.1:$base" --threads 1 --deflate &
pids+=($!)
./target/release/examples/echo --addr "127.0.0.1:$((base + 1))" --threads 1 --deflate-takeover &
pids+=($!)
wait_port "$base"; wait_port $((base + 1))
check "websockets client -> echo --deflate" "$py" interop/py_peer.py client "ws://127.0.0.1:$base/"
check "websockets client (context takeover) -> echo --deflate" "$py" interop/py_peer.py client "ws://127.0.0.1:$base/" --takeover
check "websockets client (context takeover) -> echo --deflate-takeover" "$py" interop/py_peer.py client "ws://127.0.0.1:$((base + 1))/" --takeover
check "ws client -> echo --deflate" node interop/node_peer.js client "ws://127.0.0.1:$base/"
check "ws client (context takeover) -> echo --deflate-takeover" node interop/node_peer.js client "ws://127.0.0.1:$((base + 1))/" --takeover

# Our client against their servers.
"$py" interop/py_peer.py server $((base + 2)) &
pids+=($!)
node interop/node_peer.js server $((base + 3)) &
pids+=($!)
wait_port $((base + 2)); wait_port $((base + 3))
check "deflate_interop -> websockets server" ./target/release/examples/deflate_interop "ws://127.0.0.1:$((base + 2))/"
check "deflate_interop --takeover -> websockets server" ./target/release/examples/deflate_interop "ws://127.0.0.1:$((base + 2))/" --takeover
check "deflate_interop -> ws server" ./target/release/examples/deflate_interop "ws://127.0.0.1:$((base + 3))/"
check "deflate_interop --takeover -> ws server" ./target/release/examples/deflate_interop "ws://127.0.0.1:$((base + 3))/" --takeover

if [ "$failed" -ne 0 ]; then echo "interop: $failed failed" >&2; exit 1; fi
echo "interop: all passed"
