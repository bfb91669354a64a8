#!/usr/bin/env bash
# ab.sh ROUNDS SECS "name=cmd args" ... : interleaved rounds of wsload echo against each server
# (server pinned to CPU 0, wsload to CPU 1, as compare.sh); prints msgs/s and server CPU
# (utime+stime from /proc) per message. Scenarios: SCEN="conns size,conns size" (default
# "100 20,500 16384"). Run from the repository root; med.py RUNS.txt [REF] prints medians.
rounds=$1 secs=$2; shift 2
W=${WSLOAD:-target/release/wsload}
TCK=$(getconf CLK_TCK)
port=31000
ticks() { local s; read -r s </proc/$1/stat; s=${s##*) }; local f; read -ra f <<<"$s"; echo $((f[11]+f[12])); }
for ((r=1;r<=rounds;r++)); do
 IFS=, read -ra SCS <<<"${SCEN:-100 20,500 16384}"
 for sc in "${SCS[@]}"; do
  read conns size <<<"$sc"
  for spec in "$@"; do
    name=${spec%%=*}; cmd=${spec#*=}
    port=$((port+1))
    taskset -c 0 $cmd --addr 127.0.0.1:$port >/dev/null 2>&1 &
    spid=$!
    for i in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
    t0=$(ticks $spid)
    out=$(taskset -c 1 $W echo --url ws://127.0.0.1:$port/ --conns $conns --size $size --secs $secs 2>/dev/null)
    t1=$(ticks $spid)
    kill $spid; wait $spid 2>/dev/null
    python3 -c "
import json,sys
d=json.loads('''$out''')
cpu=($t1-$t0)/$TCK
print('r$r %-12s %5s x %-6s %9.0f msgs/s  %6.2f us/msg  load %s' % ('$name',$conns,$size,d['msgs_per_sec'],cpu*1e6/max(1,d['messages']), open('/proc/loadavg').read().split()[0]))"
  done
 done
done
