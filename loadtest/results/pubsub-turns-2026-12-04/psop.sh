#!/usr/bin/env bash
# psop.sh BACKEND CONNS SECS: pubsub server on CPU 0, wsload broadcast on CPU 1; server's io_uring ops by opcode and syscalls
B=$1; N=$2; S=${3:-4}
PORT=$((20000 + RANDOM % 20000))
taskset -c 0 /work/main/target/release/examples/pubsub --addr 127.0.0.1:$PORT --backend $B --threads 1 >/tmp/exp/ps.log 2>&1 &
SP=$!; sleep 0.5
taskset -c 1 /work/main/target/release/wsload broadcast --url ws://127.0.0.1:$PORT/ --conns $N --size 20 --secs $((S+2)) > /tmp/exp/wsl.json 2>/dev/null &
WP=$!; sleep 1
perf record -q -e io_uring:io_uring_submit_req -e 'syscalls:sys_enter_sendto' -e 'syscalls:sys_enter_writev' -e 'syscalls:sys_enter_epoll_wait' -e 'syscalls:sys_enter_io_uring_enter' -e 'syscalls:sys_enter_recvfrom' -p $SP -o /tmp/exp/psop.data -- sleep $S 2>/dev/null
wait $WP; kill $SP; wait $SP 2>/dev/null
grep -o '"rounds_per_sec":[0-9.]*' /tmp/exp/wsl.json
perf script -i /tmp/exp/psop.data 2>/dev/null | awk '{ if ($0 ~ /io_uring_submit_req/) { match($0, /opcode [A-Z_]+/); k=substr($0,RSTART+7,RLENGTH-7) } else { match($0, /syscalls:sys_enter_[a-z_]+/); k=substr($0,RSTART+19,RLENGTH-19) } c[k]++ } END { for (k in c) print k, c[k] }' | sort -k2 -nr
