# Shell helpers shared by loadtest/compare.sh, crossnode.sh and scaling.sh (sourced; each
# script defines its own `log`). Process CPU from /proc, wsload's progress sampling, ports,
# stopping what a script started.

proc_ticks() { # /proc path of a process or thread -> utime + stime in clock ticks (-1 if gone)
    local stat f
    read -r stat <"$1/stat" 2>/dev/null || { echo -1; return; }
    stat=${stat##*) } # the command name may hold spaces; fields resume after ") "
    read -ra f <<<"$stat"
    echo $((f[11] + f[12])) # utime (field 14) and stime (field 15)
}

cpu_ticks() { # pid -> utime + stime of the whole process, in clock ticks (-1 if gone)
    proc_ticks "/proc/$1"
}

cpu_ticks_split() { # pid -> "TOTAL:USER" clock ticks (utime + stime, and utime alone; -1 if gone)
    local stat f
    read -r stat <"/proc/$1/stat" 2>/dev/null || { echo -1; return; }
    stat=${stat##*) }
    read -ra f <<<"$stat"
    echo "$((f[11] + f[12])):${f[11]}"
}

# `times` must run in the calling shell (not in a $(...) subshell, whose children are its
# own): its second line is the user and system time of every child the shell has reaped,
# which is how wsload's CPU time is taken.
children_cpu_s() { # file from `times >file` -> user + system seconds of reaped children
    python3 -c '
import re, sys
line = open(sys.argv[1]).read().splitlines()[-1]  # "0m1.234s 0m0.567s"
print(sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line)))' "$1"
}

# Stamps each wsload progress line with the wall clock and the server's CPU ticks, total
# and user (the format loadtest/report.py record reads).
sample_progress() { # pid samples-file log-file
    local line
    while IFS= read -r line; do
        if [[ $line == wsload:*msgs/s* ]]; then
            printf '%s %s %s\n' "$EPOCHREALTIME" "$(cpu_ticks_split "$1")" "$line" >>"$2"
        fi
        printf '%s\n' "$line" >>"$3"
    done
}

listening() { # port: a LISTEN socket on 127.0.0.1:port (or any address), without connecting
    local hex
    hex=$(printf '%04X' "$1")
    grep -qE "^ *[0-9]+: (0100007F|00000000):$hex 00000000:0000 0A" /proc/net/tcp 2>/dev/null
}

stop_pid() { # pid: SIGTERM, SIGKILL after 5 s
    local pid=$1 i
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid ignored SIGTERM for 5 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
