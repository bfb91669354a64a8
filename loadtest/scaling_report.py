#!/usr/bin/env python3
"""Records and report of loadtest/scaling.sh (multi-core scaling of the echo server).

  scaling_report.py tag --loops L --client-threads N --server-cpus LIST --client-cpus LIST
      reads one record of `loadtest/report.py record` on stdin (wsload's JSON, server CPU
      over the measuring window, client CPU) and writes it back as one line of runs.jsonl,
      with server, loops, round, msgs_per_s and server_cpu_us_per_msg first.
  scaling_report.py show            one runs.jsonl line on stdin -> a progress line
  scaling_report.py summarize --runs runs.jsonl --machine-json F --out scaling.md [--command C]
      medians per server and loop count, ratios to the server's own 1-loop rate and to
      fastwebsockets at the same loop count, the issue's goals at 8 loops; the markdown goes
      to --out and to stdout.
  scaling_report.py selftest

Standard library only.
"""
import argparse
import json
import statistics
import sys

BASELINE_PEER = "fastwebsockets"
GOAL_LOOPS = 8
GOAL_OWN = 7.0   # ≥ 7× its own 1-loop rate at 8 loops
GOAL_PEER = 1.2  # ≥ 1.2× fastwebsockets at 8 loops
FIRST_KEYS = ["server", "loops", "round", "msgs_per_s", "server_cpu_us_per_msg", "ok"]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def cmd_tag(a):
    rec = json.loads(sys.stdin.read())
    w = rec.get("wsload") or {}
    rec["loops"] = a.loops
    rec["msgs_per_s"] = w.get("msgs_per_sec")
    rec.setdefault("server_cpu_us_per_msg", None)
    rec["client_threads"] = a.client_threads
    rec["server_cpus"] = a.server_cpus
    rec["client_cpus"] = a.client_cpus
    out = {k: rec[k] for k in FIRST_KEYS if k in rec}
    out.update((k, v) for k, v in rec.items() if k not in out)
    print(json.dumps(out))


def cmd_show(_a):
    r = json.loads(sys.stdin.read())
    w = r.get("wsload") or {}
    cpu = r.get("server_cpu_us_per_msg")
    print("    %s msgs/s, p99 %s us, server %s us/msg, server %s cores, client %s cores%s" % (
        format(r.get("msgs_per_s") or 0, ",.0f"), w.get("p99_us", "-"),
        "-" if cpu is None else format(cpu, ".2f"),
        fmt(r.get("server_cpu_util"), 2), fmt(r.get("client_cpu_util"), 2),
        "" if r.get("ok") else "  PROBLEM: " + "; ".join(r.get("problems", []))))


def fmt(x, digits=0, suffix=""):
    if x is None:
        return "-"
    return format(x, f",.{digits}f") + suffix


def ncpus(spec):
    n = 0
    for part in (spec or "").split(","):
        if "-" in part:
            a, b = part.split("-")
            n += int(b) - int(a) + 1
        elif part:
            n += 1
    return n


def summarize(runs):
    """-> (servers in order, loop counts, {(server, loops): row}, failed runs)."""
    servers, loops = [], set()
    groups, failed = {}, []
    for r in runs:
        if r["server"] not in servers:
            servers.append(r["server"])
        loops.add(r["loops"])
        g = groups.setdefault((r["server"], r["loops"]), [])
        if r.get("ok") and r.get("msgs_per_s"):
            g.append(r)
        else:
            failed.append(r)
    rows = {}
    for (s, l), g in groups.items():
        rates = [r["msgs_per_s"] for r in g]
        rows[(s, l)] = {
            "server": s, "loops": l, "runs": len(g),
            "rounds": sum(1 for r in runs if r["server"] == s and r["loops"] == l),
            "msgs_per_s": median(rates),
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "server_cpu_us_per_msg": median([r.get("server_cpu_us_per_msg") for r in g]),
            "server_cores": median([r.get("server_cpu_util") for r in g]),
            "client_cores": median([r.get("client_cpu_util") for r in g]),
            "client_cpus": ncpus(g[0].get("client_cpus")) if g else None,
            "client_threads": g[0].get("client_threads") if g else None,
            "p99_us": median([(r.get("wsload") or {}).get("p99_us") for r in g]),
        }
    for (s, l), row in rows.items():
        base = rows.get((s, 1), {}).get("msgs_per_s")
        peer = rows.get((BASELINE_PEER, l), {}).get("msgs_per_s")
        m = row["msgs_per_s"]
        row["x_own_1loop"] = m / base if m and base else None
        row["x_peer"] = m / peer if m and peer else None
    return servers, sorted(loops), rows, failed


def client_bound(row):
    """wsload near the CPUs it had (or all its threads busy): it may have set the pace."""
    if row.get("client_cores") is None or not row.get("client_cpus"):
        return False
    cap = min(row["client_cpus"], row.get("client_threads") or row["client_cpus"])
    return row["client_cores"] >= 0.9 * cap


def goals(servers, loops, rows, shared):
    lines = []
    for s in servers:
        if not s.startswith("wsd-"):
            continue
        row = rows.get((s, GOAL_LOOPS))
        if GOAL_LOOPS not in loops:
            lines.append(f"- **{s}**: not measured ({GOAL_LOOPS} loops not in this run's --loops)")
            continue
        if not row or row["msgs_per_s"] is None:
            lines.append(f"- **{s}**: not measured (every run at {GOAL_LOOPS} loops failed: see Notes)")
            continue
        own, peer = row["x_own_1loop"], row["x_peer"]
        own_txt = ("not measured (no 1-loop run)" if own is None else
                   f"{own:.2f}× its 1-loop rate: {'met' if own >= GOAL_OWN else 'NOT met'}")
        peer_txt = (f"not measured (no {BASELINE_PEER} run at {GOAL_LOOPS} loops)" if peer is None else
                    f"{peer:.2f}× {BASELINE_PEER}: {'met' if peer >= GOAL_PEER else 'NOT met'}")
        caveats = []
        if shared:
            caveats.append("CPUs shared with wsload (--allow-shared): not a valid measurement")
        for name in (s, BASELINE_PEER):
            r = rows.get((name, GOAL_LOOPS))
            if r and client_bound(r):
                caveats.append(f"wsload near its CPU limit against {name}: the client may have set the pace")
        lines.append(f"- **{s}** at {GOAL_LOOPS} loops: {own_txt}; {peer_txt}"
                     + "".join(f" (⚠ {c})" for c in caveats))
    return lines


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def render(runs, machine, command):
    servers, loops, rows, failed = summarize(runs)
    header = ["server", "loops", "msgs/s (median)", "min – max", "× own 1-loop", "per-loop efficiency",
              f"× {BASELINE_PEER}", "server CPU µs/msg", "server cores busy", "client cores busy",
              "p99 µs", "ok runs"]
    body = []
    for s in servers:
        for l in loops:
            row = rows.get((s, l))
            if not row:
                continue
            own = row["x_own_1loop"]
            body.append([
                s, l, fmt(row["msgs_per_s"]),
                "-" if row["min"] is None else f"{row['min']:,.0f} – {row['max']:,.0f}",
                fmt(own, 2, "×"), fmt(own / l if own else None, 2),
                fmt(row["x_peer"], 2, "×"), fmt(row["server_cpu_us_per_msg"], 2),
                fmt(row["server_cores"], 2),
                fmt(row["client_cores"], 2) + (" ⚠" if client_bound(row) else ""),
                fmt(row["p99_us"]), f"{row['runs']}/{row['rounds']}",
            ])
    m = machine or {}
    out = ["# Multi-core scaling: echo, " + (runs[0].get("scenario", "") if runs else ""), ""]
    if command:
        out += [f"`{command}`", ""]
    out += [
        f"Machine: {m.get('nproc', '?')} CPUs ({m.get('cpus', '?')}), {m.get('cpu', '?')}, "
        f"{m.get('kernel', '?')}, {m.get('memory', '?')} RAM; {m.get('date', '?')}; commit {m.get('commit', '?')}; "
        f"{m.get('rustc', '')}. Load average {m.get('loadavg at start', '?')} at start, "
        f"{m.get('loadavg at end', '?')} at end.",
        "",
        f"Load: {m.get('load', '?')}, {m.get('rounds x secs', '?')} per run. Pinning: {m.get('pinning', '?')}.",
        "",
        f"**Goals** (at {GOAL_LOOPS} loops): ≥ {GOAL_OWN:g}× the server's own 1-loop rate; "
        f"≥ {GOAL_PEER:g}× {BASELINE_PEER} with as many workers, pinned the same way.",
        "",
    ]
    out += goals(servers, loops, rows, m.get("shared")) or ["- no wsd-* server in this run"]
    out += [""]
    out += md_table(header, body)
    out += ["",
            "msgs/s: echoes per second in wsload's measuring window, median over rounds (min – max over "
            "rounds). × own 1-loop: ÷ the same server's 1-loop median; per-loop efficiency: that ÷ loops "
            f"(1.00 is linear). × {BASELINE_PEER}: ÷ {BASELINE_PEER}'s median at the same loop count. "
            "Server CPU µs/msg: utime+stime from /proc/PID/stat over the measuring window ÷ messages in it; "
            "server / client cores busy: CPU seconds ÷ wall seconds (server over the window, wsload over "
            "its whole run). ⚠: wsload used ≥ 90% of what it had (its CPUs or threads), so the client may "
            "have set the pace: msgs/s then understates the server, compare CPU µs/msg."]
    notes = []
    if m.get("shared"):
        notes.append("--allow-shared: the machine had fewer than 2 × max(loops) CPUs; wsload had fewer CPUs "
                     "than the largest server, or shared one with it: these numbers do not show the server's "
                     "scaling.")
    try:
        busy = float(str(m.get("loadavg at start", "0")).split()[0])
        if m.get("nproc") and busy > m["nproc"] / 4:
            notes.append(f"load average {busy} at start on {m['nproc']} CPUs: other work shared the machine.")
    except ValueError:
        pass
    for r in failed:
        notes.append(f"{r['server']} at {r['loops']} loop(s), round {r['round']}: "
                     + "; ".join(r.get("problems") or ["no msgs/s"]) + " (left out of the medians)")
    if notes:
        out += ["", "Notes:", ""] + ["- " + n for n in notes]
    return "\n".join(out) + "\n"


def cmd_summarize(a):
    runs = []
    with open(a.runs, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    machine = None
    if a.machine_json:
        try:
            with open(a.machine_json, encoding="utf-8") as f:
                machine = json.load(f)
        except OSError:
            pass
    text = render(runs, machine, a.command)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    sys.stdout.write(text)


def cmd_selftest(_a):
    runs = []
    for rnd in (1, 2, 3):
        for l in (1, 2, 4, 8):
            for s, base, eff in (("wsd-epoll", 200000, 0.95), ("fastwebsockets", 150000, 0.8)):
                rate = base * (1 + (l - 1) * eff) * (1 + 0.01 * rnd)
                runs.append({"server": s, "loops": l, "round": rnd, "msgs_per_s": rate, "ok": True,
                             "server_cpu_us_per_msg": 5.0, "server_cpu_util": l * 0.9,
                             "client_cpu_util": 3.0, "client_cpus": "8-15", "client_threads": 8,
                             "wsload": {"p99_us": 800, "msgs_per_sec": rate}, "scenario": "100×20 B"})
    runs.append({"server": "wsd-epoll", "loops": 8, "round": 4, "msgs_per_s": None, "ok": False,
                 "problems": ["wsload exit status 124"], "wsload": None})
    servers, loops, rows, failed = summarize(runs)
    assert servers == ["wsd-epoll", "fastwebsockets"] and loops == [1, 2, 4, 8]
    r8 = rows[("wsd-epoll", 8)]
    assert abs(r8["x_own_1loop"] - (1 + 7 * 0.95)) < 1e-9, r8
    assert abs(r8["x_peer"] - 200000 * 7.65 / (150000 * 6.6)) < 1e-9, r8
    assert len(failed) == 1 and r8["runs"] == 3 and r8["rounds"] == 4
    text = render(runs, {"nproc": 16}, "selftest")
    assert "7.65× its 1-loop rate: met" in text and "1.55× fastwebsockets: met" in text, text
    assert "not measured" not in text
    text = render([r for r in runs if r["loops"] == 1], {}, "")
    assert "not measured (8 loops not in this run" in text, text
    print("scaling_report selftest: ok")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tag")
    t.add_argument("--loops", type=int, required=True)
    t.add_argument("--client-threads", type=int, required=True)
    t.add_argument("--server-cpus", required=True)
    t.add_argument("--client-cpus", required=True)
    sub.add_parser("show")
    s = sub.add_parser("summarize")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--machine-json")
    s.add_argument("--command", default="")
    sub.add_parser("selftest")
    a = p.parse_args()
    {"tag": cmd_tag, "show": cmd_show, "summarize": cmd_summarize, "selftest": cmd_selftest}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
