#!/bin/bash
# sc-ab.sh N LABEL... : runs the stream-cost builds /tmp/stream-cost-LABEL in turn, N times
# each (two rounds per run, on CPU 0), and prints per label the median of
# websocket-driver's ns per message ÷ fastwebsockets' in the same run (the ratio cancels
# most of this VM's drift between runs). Raw lines (label, wsd ns, fws ns, ratio) go to
# $OUT (default /tmp/sc-ab.out).
N=$1; shift
for i in $(seq 1 "$N"); do for b in "$@"; do
  taskset -c 0 "/tmp/stream-cost-$b" --rounds 2 --messages 2000000 ${SC_EXTRA:-} | grep -v median |
    paste - - | awk -v b="$b" '{w=$(5); f=$(11); printf "%s %.1f %.1f %.3f\n", b, w, f, w/f}'
done; done > "${OUT:-/tmp/sc-ab.out}"
python3 "$(dirname "$0")/sc-sum.py" "$@"
