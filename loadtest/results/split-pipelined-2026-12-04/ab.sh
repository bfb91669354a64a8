#!/usr/bin/env bash
# usage: ab.sh ROUNDS SECS SIZE CONNS label=cmd ... ; prints per-run and medians of µs/msg (user, kernel) and msgs/s
R=$1; S=$2; SIZE=$3; CONNS=$4; shift 4
TCK=$(getconf CLK_TCK)
declare -A RES
for r in $(seq 1 $R); do
  for spec in "$@"; do
    label=${spec%%=*}; cmd=${spec#*=}
    PORT=$((20000 + RANDOM % 20000))
    taskset -c 0 $cmd --addr 127.0.0.1:$PORT --threads 1 >/tmp/exp/ab.srv.log 2>&1 &
    SP=$!; sleep 0.4
    read -r u0 s0 < <(awk '{print $14, $15}' /proc/$SP/stat)
    out=$(taskset -c 1 /work/main/target/release/wsload echo --url ws://127.0.0.1:$PORT/ --conns $CONNS --size $SIZE --secs $S $WSLOAD_EXTRA 2>/dev/null)
    read -r u1 s1 < <(awk '{print $14, $15}' /proc/$SP/stat)
    kill $SP; wait $SP 2>/dev/null
    msgs=$(echo "$out" | grep -o '"messages":[0-9]*' | head -1 | cut -d: -f2)
    [ -z "$msgs" ] && msgs=$(echo "$out" | grep -o '"msgs_per_sec":[0-9.]*' | cut -d: -f2 | awk -v s=$S '{print int($1*s)}')
    line=$(awk -v u=$((u1-u0)) -v s=$((s1-s0)) -v m=$msgs -v t=$TCK -v S=$S 'BEGIN{printf "%.0f %.2f %.2f %.2f", m/S, u/t*1e6/m, s/t*1e6/m, (u+s)/t*1e6/m}')
    echo "$r $label $line"
    RES[$label]+="$line
"
  done
done
echo "== medians: msgs/s user kernel total (µs/msg)"
for spec in "$@"; do label=${spec%%=*}
  printf "%s" "${RES[$label]}" | python3 -c "
import sys,statistics as st
rows=[list(map(float,l.split())) for l in sys.stdin if l.strip()]
print('$label', *['%.2f'%st.median(c) for c in zip(*rows)])"
done
