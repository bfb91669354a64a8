#!/bin/bash
# A/B of whole builds (server + wsload) at broadcast N: alternating old/new per round.
# usage: ab-bc.sh ROUNDS SECS N BACKEND  (OLD=/tmp/old-target/release NEW=target/release)
R=$1; S=$2; N=$3; B=$4
OLD=${OLD:-/tmp/old-target/release}; NEW=${NEW:-/work/main/target/release}
for r in $(seq 1 $R); do
  for v in old new; do
    d=$OLD; [ $v = new ] && d=$NEW
    PORT=$((20000 + RANDOM % 20000))
    taskset -c 0 $d/examples/pubsub --addr 127.0.0.1:$PORT --backend $B --threads 1 >/dev/null 2>&1 &
    SP=$!
    sleep 0.4
    t0=$(awk '{print $14+$15}' /proc/$SP/stat)
    out=$(timeout 60 taskset -c 1 $d/wsload broadcast --url ws://127.0.0.1:$PORT/ --conns $N --size 20 --secs $S 2>/dev/null)
    t1=$(awk '{print $14+$15}' /proc/$SP/stat)
    kill $SP; wait $SP 2>/dev/null
    echo "$out" | python3 -c "import json,sys;d=json.load(sys.stdin);print('$r $v $B N=$N', 'rounds/s %.1f'%d['rounds_per_sec'], 'deliv/s %.0f'%d['deliveries_per_sec'], 'missing',d['missing'],'errors',d['errors'], 'server_cpu_s %.2f'%(($t1-$t0)/100))"
  done
done
