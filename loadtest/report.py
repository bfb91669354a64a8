#!/usr/bin/env python3
"""The data half of loadtest/compare.sh (python3 stdlib only).

    report.py record  ...   one run's raw measurements -> one JSON line (compare.sh appends
                            it to results/runs.jsonl)
    report.py summarize --runs runs.jsonl --out DIR --command CMD [--machine-json FILE]
                            medians over rounds -> a table on stdout, DIR/compare.json,
                            DIR/compare.md and DIR/compare.svg
    report.py selftest      summarize made-up runs into a temporary folder (checks this script)

Pub/sub runs (`--kind broadcast` / `--kind fanout`, from `wsload broadcast` / `wsload fanout`
against the pub/sub servers) get their own table: rounds/s and deliveries/s, p50/p99 (round
time for broadcast, publish-to-delivery latency for fanout), server CPU per delivery, missing
deliveries. Missing deliveries (a peer dropping them for a lagging subscriber, a round that
never completed) are part of the result, shown in the table; mismatched messages are errors.

Slow-reader runs (`--kind slow`, from `wsload slow`) get their own table: the normal echo
clients' rate and p99 next to the server's largest RSS growth, the bytes the non-reading
flooder got in and whether the server disconnected it. A server that died during such a run
is a result, not a failed measurement: its numbers stay in the table, flagged.

Server CPU per message comes from /proc/PID/stat (utime + stime, in clock ticks) sampled
each time wsload prints a progress line, so it covers the measuring window only; when fewer
than two progress lines came (--secs < 2) it falls back to the whole wsload run (handshakes
and warm-up included, so a little high) and says so in `cpu_basis`.
"""
import argparse
import html
import json
import math
import os
import re
import statistics
import sys
import tempfile

# The interleaving order of compare.sh; peers are the ones "ratio to best peer" compares to.
SERVERS = ["wsd-epoll", "wsd-io-uring", "tokio-tungstenite", "fastwebsockets",
           "pubsub-tungstenite", "pubsub-fastwebsockets"]
PEERS = ["tokio-tungstenite", "fastwebsockets"]
PUBSUB_PEERS = ["pubsub-tungstenite", "pubsub-fastwebsockets"]
PUBSUB_KINDS = ("broadcast", "fanout")
COLORS = {
    "wsd-epoll": "#1f77b4",
    "wsd-io-uring": "#17becf",
    "tokio-tungstenite": "#ff7f0e",
    "fastwebsockets": "#d62728",
    "pubsub-tungstenite": "#ff7f0e",
    "pubsub-fastwebsockets": "#d62728",
    "base-epoll": "#7f7f7f",
    "base-io-uring": "#bcbd22",
}
PROGRESS = re.compile(r"wsload:\s+([\d.]+)s\s+(\d+)\s+msgs/s")


# ----- record -----

def last_json_object(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def parse_samples(path):
    """Lines `EPOCHREALTIME TICKS[:USER_TICKS] <wsload progress line>`
    -> [(wall_s, ticks, window_s, msgs, user_ticks or None)]."""
    samples = []
    if not path or not os.path.exists(path):
        return samples
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) < 3:
                continue
            m = PROGRESS.search(parts[2])
            if not m:
                continue
            try:
                wall = float(parts[0])
                total, _, user = parts[1].partition(":")
                ticks, user = int(total), (int(user) if user else None)
            except ValueError:
                continue
            if ticks < 0:
                continue
            samples.append((wall, ticks, float(m.group(1)), int(m.group(2)), user))
    return samples


def cmd_record(a):
    rec = {
        "kind": a.kind,
        "server": a.server,
        "scenario": a.scenario,
        "round": a.round,
        "rc": a.rc,
    }
    try:
        with open(a.json, encoding="utf-8", errors="replace") as f:
            result = last_json_object(f.read())
    except OSError:
        result = None
    rec["wsload"] = result
    clk = a.clk_tck or 100
    whole_ticks = None
    if a.cpu_before >= 0 and a.cpu_after >= 0:
        whole_ticks = a.cpu_after - a.cpu_before
        rec["server_cpu_s_whole_run"] = whole_ticks / clk
    if a.client_cpu_s >= 0:
        rec["client_cpu_s"] = a.client_cpu_s
    if a.wall_s > 0:
        rec["wall_s"] = a.wall_s
    problems = []
    if a.server_exited:
        problems.append("server exited during the run")
    if a.rc != 0:
        problems.append(f"wsload exit status {a.rc}")
    if result is None:
        problems.append("no JSON from wsload")
    elif a.kind in ("echo",) + PUBSUB_KINDS:
        if result.get("errors", 0):
            problems.append(f"{result['errors']} errors")
        samples = parse_samples(a.samples)
        rec["progress_samples"] = len(samples)
        messages = result.get("messages", result.get("deliveries", 0))
        if len(samples) >= 2:
            first, last = samples[0], samples[-1]
            window_msgs = sum(s[3] for s in samples[1:])
            ticks = last[1] - first[1]
            wall = last[0] - first[0]
            rec["cpu_basis"] = "window"
            rec["cpu_window_s"] = round(wall, 3)
            rec["cpu_window_msgs"] = window_msgs
            rec["server_cpu_s"] = ticks / clk
            if window_msgs > 0:
                rec["server_cpu_us_per_msg"] = ticks / clk * 1e6 / window_msgs
                # The same split into user space and the kernel (utime / stime).
                if first[4] is not None and last[4] is not None:
                    user = last[4] - first[4]
                    rec["server_user_us_per_msg"] = user / clk * 1e6 / window_msgs
                    rec["server_sys_us_per_msg"] = (ticks - user) / clk * 1e6 / window_msgs
            if wall > 0:
                rec["server_cpu_util"] = ticks / clk / wall
        elif whole_ticks is not None and messages > 0:
            rec["cpu_basis"] = "whole run"
            rec["server_cpu_s"] = whole_ticks / clk
            rec["server_cpu_us_per_msg"] = whole_ticks / clk * 1e6 / messages
            secs = result.get("secs") or 0
            if secs > 0:
                rec["server_cpu_util"] = whole_ticks / clk / max(a.wall_s, secs)
        if rec.get("client_cpu_s") is not None and a.wall_s > 0:
            rec["client_cpu_util"] = rec["client_cpu_s"] / a.wall_s
        if not messages:
            problems.append("no messages")
        notes = []
        if result.get("missing"):
            notes.append(f"{result['missing']} deliveries missing")
        if result.get("stalled"):
            notes.append("a round never completed (stalled)")
        if notes:
            rec["notes"] = notes
    elif a.kind == "slow":
        notes = []
        if not result:
            problems.append("no JSON from wsload")
        elif not result.get("flooder_connected", False):
            problems.append(f"the flooder did not connect: {result.get('flooder_error')}")
        if result:
            if result.get("errors", 0):
                notes.append(f"{result['errors']} errors on the normal clients")
            if result.get("rss_cap_hit"):
                notes.append(f"server RSS grew past wsload's cap ({result.get('server_rss_growth_max_kib', 0) // 1024} MiB): "
                             "flooder stopped early")
            if not result.get("messages"):
                notes.append("the normal clients got no echo in the window")
        if result and (a.server_exited or result.get("server_gone")):
            notes.append("server died during the run")
            rec["server_died"] = True
            # A server the flooder took down is the scenario's result: keep its numbers.
            problems = [p for p in problems if p != "server exited during the run"]
            if a.rc == 0:
                problems = [p for p in problems if not p.startswith("wsload exit status")]
        if notes:
            rec["notes"] = notes
    elif a.kind == "idle":
        if not result.get("all_opened", True) or result.get("held", result.get("conns")) != result.get("conns"):
            problems.append(f"held {result.get('held')} of {result.get('conns')} connections")
    rec["ok"] = not problems
    if problems:
        rec["problems"] = problems
    print(json.dumps(rec, sort_keys=True))


# ----- summarize -----

def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def load_runs(path):
    runs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    return runs


def ordered(names):
    return [s for s in SERVERS if s in names] + sorted(n for n in names if n not in SERVERS)


def summarize(runs, rounds=None, secs=None):
    scenarios = []  # keep first-seen order
    for r in runs:
        if r["kind"] == "echo" and r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    out = {"scenarios": [], "idle": None}
    for name in scenarios:
        rs = [r for r in runs if r["kind"] == "echo" and r["scenario"] == name]
        servers = {}
        for server in ordered({r["server"] for r in rs}):
            mine = [r for r in rs if r["server"] == server]
            good = [r for r in mine if r["ok"]]
            w = [r["wsload"] for r in good]
            servers[server] = {
                "runs": len(mine),
                "ok_runs": len(good),
                "msgs_per_sec": median([x.get("msgs_per_sec") for x in w]),
                "mb_per_sec": median([x.get("mb_per_sec") for x in w]),
                "p50_us": median([x.get("p50_us") for x in w]),
                "p99_us": median([x.get("p99_us") for x in w]),
                "p999_us": median([x.get("p999_us") for x in w]),
                "server_cpu_us_per_msg": median([r.get("server_cpu_us_per_msg") for r in good]),
                "server_user_us_per_msg": median([r.get("server_user_us_per_msg") for r in good]),
                "server_sys_us_per_msg": median([r.get("server_sys_us_per_msg") for r in good]),
                "server_cpu_util": median([r.get("server_cpu_util") for r in good]),
                "client_cpu_util": median([r.get("client_cpu_util") for r in good]),
                "errors": sum((r["wsload"] or {}).get("errors", 0) for r in mine),
                "cpu_basis": sorted({r.get("cpu_basis") for r in good if r.get("cpu_basis")}),
                "problems": [f"round {r['round']}: {'; '.join(r['problems'])}" for r in mine if not r["ok"]],
                "per_round_msgs_per_sec": [(r["wsload"] or {}).get("msgs_per_sec") if r["ok"] else None for r in mine],
            }
        first = rs[0]["wsload"] or {} if rs else {}
        conns = next((r["wsload"]["conns"] for r in rs if r["wsload"]), None)
        size = next((r["wsload"]["size"] for r in rs if r["wsload"]), None)
        peer_rates = {p: servers[p]["msgs_per_sec"] for p in PEERS if p in servers and servers[p]["msgs_per_sec"]}
        best_peer = max(peer_rates, key=peer_rates.get) if peer_rates else None
        peer_cpu = {p: servers[p]["server_cpu_us_per_msg"] for p in PEERS
                    if p in servers and servers[p]["server_cpu_us_per_msg"]}
        best_cpu_peer = min(peer_cpu, key=peer_cpu.get) if peer_cpu else None
        for s in servers.values():
            s["ratio_to_best_peer"] = (s["msgs_per_sec"] / peer_rates[best_peer]
                                       if best_peer and s["msgs_per_sec"] is not None else None)
            s["cpu_ratio_to_best_peer"] = (s["server_cpu_us_per_msg"] / peer_cpu[best_cpu_peer]
                                           if best_cpu_peer and s["server_cpu_us_per_msg"] is not None else None)
        del first
        out["scenarios"].append({
            "name": name, "conns": conns, "size": size,
            "best_peer": best_peer, "best_cpu_peer": best_cpu_peer, "servers": servers,
        })
    idle_runs = [r for r in runs if r["kind"] == "idle"]
    if idle_runs:
        servers = {}
        for server in ordered({r["server"] for r in idle_runs}):
            mine = [r for r in idle_runs if r["server"] == server]
            good = [r for r in mine if r["ok"]]
            w = [r["wsload"] for r in good]
            servers[server] = {
                "runs": len(mine),
                "ok_runs": len(good),
                "conns": median([x.get("conns") for x in w]),
                "held": median([x.get("held") for x in w]),
                "rss_before_kib": median([x.get("rss_before_kib") for x in w]),
                "rss_after_kib": median([x.get("rss_after_kib") for x in w]),
                "bytes_per_conn": median([x.get("bytes_per_conn") for x in w]),
                "problems": [f"round {r['round']}: {'; '.join(r['problems'])}" for r in mine if not r["ok"]],
            }
        peer_mem = {p: servers[p]["bytes_per_conn"] for p in PEERS
                    if p in servers and servers[p]["bytes_per_conn"]}
        best = min(peer_mem, key=peer_mem.get) if peer_mem else None
        for s in servers.values():
            s["ratio_to_best_peer"] = (s["bytes_per_conn"] / peer_mem[best]
                                       if best and s["bytes_per_conn"] is not None else None)
        out["idle"] = {"conns": median([r["wsload"].get("conns") for r in idle_runs if r["wsload"]]),
                       "best_peer": best, "servers": servers}
    out["slow"] = summarize_slow([r for r in runs if r["kind"] == "slow"])
    out["pubsub"] = summarize_pubsub([r for r in runs if r["kind"] in PUBSUB_KINDS])
    return out


def summarize_pubsub(ps_runs):
    """Broadcast and fanout runs -> per scenario and server, medians over rounds. × best peer
    compares deliveries/s (broadcast: the faster pub/sub peer; fanout offers a fixed rate, so
    it mostly shows who kept up) and CPU per delivery (the leaner peer)."""
    scenarios = []
    for r in ps_runs:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])
    out = []
    for name in scenarios:
        rs = [r for r in ps_runs if r["scenario"] == name]
        servers = {}
        for server in ordered({r["server"] for r in rs}):
            mine = [r for r in rs if r["server"] == server]
            good = [r for r in mine if r["ok"]]
            w = [r["wsload"] for r in good]
            servers[server] = {
                "runs": len(mine),
                "ok_runs": len(good),
                "rounds_per_sec": median([x.get("rounds_per_sec") for x in w]),
                "deliveries_per_sec": median([x.get("deliveries_per_sec") for x in w]),
                "p50_us": median([x.get("p50_us") for x in w]),
                "p99_us": median([x.get("p99_us") for x in w]),
                "p999_us": median([x.get("p999_us") for x in w]),
                "server_cpu_us_per_delivery": median([r.get("server_cpu_us_per_msg") for r in good]),
                "server_cpu_util": median([r.get("server_cpu_util") for r in good]),
                "client_cpu_util": median([r.get("client_cpu_util") for r in good]),
                "missing": sum((r["wsload"] or {}).get("missing", 0) for r in mine),
                "stalled_runs": sum(bool((r["wsload"] or {}).get("stalled")) for r in mine),
                "errors": sum((r["wsload"] or {}).get("errors", 0) for r in mine),
                "cpu_basis": sorted({r.get("cpu_basis") for r in good if r.get("cpu_basis")}),
                "problems": [f"round {r['round']}: {'; '.join(r['problems'])}" for r in mine if not r["ok"]],
                "notes": [f"round {r['round']}: {'; '.join(r['notes'])}" for r in mine if r.get("notes")],
                "per_round_deliveries_per_sec": [(r["wsload"] or {}).get("deliveries_per_sec") if r["ok"] else None
                                                 for r in mine],
            }
        w0 = next((r["wsload"] for r in rs if r["wsload"]), {})
        kind = rs[0]["kind"]
        rates = {p: servers[p]["deliveries_per_sec"] for p in PUBSUB_PEERS
                 if p in servers and servers[p]["deliveries_per_sec"]}
        best = max(rates, key=rates.get) if rates else None
        cpus = {p: servers[p]["server_cpu_us_per_delivery"] for p in PUBSUB_PEERS
                if p in servers and servers[p]["server_cpu_us_per_delivery"]}
        best_cpu = min(cpus, key=cpus.get) if cpus else None
        for s in servers.values():
            s["ratio_to_best_peer"] = (s["deliveries_per_sec"] / rates[best]
                                       if best and s["deliveries_per_sec"] is not None else None)
            s["cpu_ratio_to_best_peer"] = (s["server_cpu_us_per_delivery"] / cpus[best_cpu]
                                           if best_cpu and s["server_cpu_us_per_delivery"] is not None else None)
        out.append({
            "name": name, "kind": kind,
            "conns": w0.get("conns", w0.get("subs")), "size": w0.get("size", 16 if kind == "fanout" else None),
            "rate": w0.get("rate"), "best_peer": best, "best_cpu_peer": best_cpu, "servers": servers,
        })
    return out


def summarize_slow(slow_runs):
    """Slow-reader runs -> per server: medians over rounds for the normal clients and the
    flooder, the largest RSS growth of any round (memory is about the worst case)."""
    if not slow_runs:
        return None
    servers = {}
    for server in ordered({r["server"] for r in slow_runs}):
        mine = [r for r in slow_runs if r["server"] == server]
        good = [r for r in mine if r["ok"]]
        w = [r["wsload"] for r in good]
        growth = [x.get("server_rss_growth_max_kib") for x in w if x.get("server_rss_growth_max_kib") is not None]
        disc = [bool(x.get("flooder_disconnected")) for x in w]
        servers[server] = {
            "runs": len(mine),
            "ok_runs": len(good),
            "msgs_per_sec": median([x.get("msgs_per_sec") for x in w]),
            "p50_us": median([x.get("p50_us") for x in w]),
            "p99_us": median([x.get("p99_us") for x in w]),
            "p999_us": median([x.get("p999_us") for x in w]),
            "rss_start_kib": median([x.get("server_rss_start_kib") for x in w]),
            "rss_growth_max_mib": max(growth) / 1024 if growth else None,
            "flooder_mib_sent": median([x.get("flooder_bytes_sent", 0) / 2**20 for x in w]),
            "flooder_last_progress_s": median([x.get("flooder_last_progress_s") for x in w]),
            "flooder_disconnected_runs": sum(disc),
            "flooder_disconnected_at_s": median([x.get("flooder_disconnected_at_s") for x in w]),
            "rss_cap_hit_runs": sum(bool(x.get("rss_cap_hit")) for x in w),
            "server_died_runs": sum(bool(r.get("server_died")) for r in mine),
            "errors": sum((r["wsload"] or {}).get("errors", 0) for r in mine),
            "problems": [f"round {r['round']}: {'; '.join(r['problems'])}" for r in mine if not r["ok"]],
            "notes": [f"round {r['round']}: {'; '.join(r['notes'])}" for r in mine if r.get("notes")],
        }
    conns = next((r["wsload"].get("conns") for r in slow_runs if r["wsload"]), None)
    size = next((r["wsload"].get("size") for r in slow_runs if r["wsload"]), None)
    flood = next((r["wsload"].get("flood_size") for r in slow_runs if r["wsload"]), None)
    return {"conns": conns, "size": size, "flood_size": flood, "servers": servers}


def slow_title(slow):
    return f"Slow reader (one non-reading flooder + {fmt(slow['conns']) if slow['conns'] else 'N'} echo clients)"


def slow_table(slow):
    """-> (header, rows) for the slow-reader table."""
    header = ["server", "normal msgs/s", "normal p99 µs", "server RSS growth MiB (max)",
              "flooder bytes sent MiB", "flooder disconnected", "errors"]
    rows = []
    for name, s in ((slow or {}).get("servers") or {}).items():
        flags = []
        if s["ok_runs"] != s["runs"]:
            flags.append(f"{s['runs'] - s['ok_runs']} of {s['runs']} runs failed")
        if s["server_died_runs"]:
            flags.append("died" if s["server_died_runs"] == s["runs"] else f"died in {s['server_died_runs']} of {s['runs']}")
        if s["rss_cap_hit_runs"]:
            flags.append("RSS cap hit")
        growth = fmt(s["rss_growth_max_mib"], 1)
        if s["rss_cap_hit_runs"] and s["rss_growth_max_mib"] is not None:
            growth = "≥ " + growth
        n, d = s["ok_runs"], s["flooder_disconnected_runs"]
        if not n:
            disc = "—"
        elif d == 0:
            disc = "no"
        else:
            disc = ("yes" if d == n else f"{d} of {n}") + (f" ({s['flooder_disconnected_at_s']:.1f} s)"
                                                          if s["flooder_disconnected_at_s"] is not None else "")
        rows.append([name + (f" ({', '.join(flags)})" if flags else ""), fmt(s["msgs_per_sec"]), fmt(s["p99_us"]),
                     growth, fmt(s["flooder_mib_sent"], 1), disc, str(s["errors"])])
    return header, rows


def fmt(x, digits=0, suffix=""):
    if x is None:
        return "—"
    if digits == 0:
        return f"{x:,.0f}{suffix}"
    return f"{x:,.{digits}f}{suffix}"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def pct(x):
    return "—" if x is None else f"{100 * x:.0f}%"


def pubsub_table(pubsub):
    """-> (header, rows) for the pub/sub table."""
    header = ["scenario", "server", "rounds/s", "deliveries/s", "× best peer", "p50 µs", "p99 µs",
              "server CPU µs/delivery", "CPU/delivery × best peer", "server CPU", "client CPU", "missing", "errors"]
    rows = []
    for sc in pubsub or []:
        for name, s in sc["servers"].items():
            flags = []
            if s["ok_runs"] != s["runs"]:
                flags.append(f"{s['runs'] - s['ok_runs']} of {s['runs']} runs failed")
            if s["stalled_runs"]:
                flags.append(f"stalled in {s['stalled_runs']} of {s['runs']}")
            rows.append([sc["name"], name + (f" ({', '.join(flags)})" if flags else ""),
                         fmt(s["rounds_per_sec"], 1) if sc["kind"] == "broadcast" else "—",
                         fmt(s["deliveries_per_sec"]), fmt_ratio(s["ratio_to_best_peer"]),
                         fmt(s["p50_us"]), fmt(s["p99_us"]),
                         fmt(s["server_cpu_us_per_delivery"], 3), fmt_ratio(s["cpu_ratio_to_best_peer"]),
                         pct(s["server_cpu_util"]), pct(s["client_cpu_util"]), fmt(s["missing"]), str(s["errors"])])
    return header, rows


PUBSUB_NOTE = ("broadcast N: N clients on one topic; each round every client sends one message and the round "
               "ends when all N×N deliveries (the sender's own included) arrived; p50/p99 are round times. "
               "fanout: one publisher, N subscribers, a fixed publish rate; p50/p99 are publish → delivery "
               "latencies. × best peer divides by the faster of " + " / ".join(PUBSUB_PEERS)
               + " (CPU: the leaner); missing counts deliveries that never arrived, summed over rounds.")


def split(s):
    """The user · kernel CPU per message, or "-" for runs recorded without the split."""
    user, sys_ = s.get("server_user_us_per_msg"), s.get("server_sys_us_per_msg")
    if user is None or sys_ is None:
        return "-"
    return f"{fmt(user, 2)} · {fmt(sys_, 2)}"


def tables(summary):
    """-> (echo header, echo rows, idle header, idle rows), cells as strings."""
    eh = ["scenario", "server", "msgs/s", "× best peer", "MB/s", "p99 µs",
          "server CPU µs/msg", "user · kernel µs/msg", "CPU/msg × best peer", "server CPU", "client CPU",
          "errors"]
    er = []
    for sc in summary["scenarios"]:
        for name, s in sc["servers"].items():
            flag = "" if s["ok_runs"] == s["runs"] else f" ({s['runs'] - s['ok_runs']} of {s['runs']} runs failed)"
            er.append([sc["name"], name + flag, fmt(s["msgs_per_sec"]), fmt_ratio(s["ratio_to_best_peer"]),
                       fmt(s["mb_per_sec"], 1), fmt(s["p99_us"]),
                       fmt(s["server_cpu_us_per_msg"], 2), split(s),
                       fmt_ratio(s["cpu_ratio_to_best_peer"]),
                       pct(s["server_cpu_util"]), pct(s["client_cpu_util"]), str(s["errors"])])
    ih = ["server", "connections held", "RSS before KiB", "RSS after KiB", "bytes/conn", "× best peer"]
    ir = []
    if summary["idle"]:
        for name, s in summary["idle"]["servers"].items():
            flag = "" if s["ok_runs"] == s["runs"] else f" ({s['runs'] - s['ok_runs']} of {s['runs']} runs failed)"
            ir.append([name + flag, fmt(s["held"]), fmt(s["rss_before_kib"]), fmt(s["rss_after_kib"]),
                       fmt(s["bytes_per_conn"]), fmt_ratio(s["ratio_to_best_peer"])])
    return eh, er, ih, ir


NUMERIC_FROM = 2  # columns from here on are right-aligned


def text_table(header, rows, numeric_from=NUMERIC_FROM):
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.rjust(w) if i >= numeric_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev and header[0] == "scenario":
            out.append("")
        prev = r[0]
        out.append(line(r))
    return "\n".join(out)


def md_table(header, rows, numeric_from=NUMERIC_FROM):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i >= numeric_from else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def problems_text(summary):
    lines = []
    for sc in summary["scenarios"]:
        for name, s in sc["servers"].items():
            for p in s["problems"]:
                lines.append(f"{sc['name']} / {name}: {p}")
            if "whole run" in s["cpu_basis"]:
                lines.append(f"{sc['name']} / {name}: server CPU per message measured over the whole run "
                             "(--secs < 2 leaves no progress window), so it includes handshakes and warm-up")
    if summary["idle"]:
        for name, s in summary["idle"]["servers"].items():
            for p in s["problems"]:
                lines.append(f"idle / {name}: {p}")
    if summary.get("slow"):
        for name, s in summary["slow"]["servers"].items():
            for p in s["problems"] + s["notes"]:
                lines.append(f"slow reader / {name}: {p}")
    for sc in summary.get("pubsub") or []:
        for name, s in sc["servers"].items():
            for p in s["problems"] + s["notes"]:
                lines.append(f"{sc['name']} / {name}: {p}")
            if "whole run" in s["cpu_basis"]:
                lines.append(f"{sc['name']} / {name}: server CPU per delivery measured over the whole run "
                             "(--secs < 2 leaves no progress window), so it includes handshakes and warm-up")
    return lines


def busy_warning(machine):
    """A line when other work was running: load average above a quarter of the CPUs."""
    loads = []
    for key in ("loadavg at start", "loadavg at end"):
        try:
            loads.append(float(str(machine.get(key, "")).split()[0]))
        except (ValueError, IndexError):
            pass
    cpus = machine.get("nproc") or 2
    if loads and max(loads) > cpus / 4:
        return (f"the machine was busy (1-minute load average {' → '.join(f'{x:.2f}' for x in loads)} on "
                f"{cpus} CPUs): other processes shared the pinned cores, so absolute numbers are low and noisy; "
                "compare ratios from a run on an idle machine")
    return None


# ----- SVG -----

def svg_chart(summary, title):
    """Three panels: throughput relative to the best peer, server CPU per message relative to
    the best peer, idle memory per connection. Hand-written SVG, no plotting library."""
    servers = ordered({n for sc in summary["scenarios"] for n in sc["servers"]}
                      | {n for sc in summary.get("pubsub") or [] for n in sc["servers"]}
                      | set((summary["idle"] or {}).get("servers", {})))
    W, left, right = 960, 70, 20
    panel_h, gap_top = 230, 60
    parts = []
    y0 = 70
    legend = []
    x = left
    for s in servers:
        legend.append(f'<rect x="{x}" y="44" width="12" height="12" fill="{COLORS.get(s, "#888")}"/>'
                      f'<text x="{x + 16}" y="54" class="l">{html.escape(s)}</text>')
        x += 30 + 8 * len(s)

    def panel(y, heading, groups, value, label, ref_line, ylabel, log_scale=False):
        """groups: [(group label, {server: row})]. log_scale: a log10 axis (for values that
        span orders of magnitude, like idle memory across servers)."""
        out = [f'<text x="{left}" y="{y - 8}" class="h">{html.escape(heading)}</text>']
        plot_h = panel_h - 60
        top, bottom = y + 10, y + 10 + plot_h
        vals = [value(r) for _, rows in groups for r in rows.values() if value(r) is not None]
        if log_scale:
            positive = [v for v in vals if v > 0] or [1.0]
            lo = 10 ** math.floor(math.log10(min(positive)))
            hi = 10 ** math.ceil(math.log10(max(positive) * 1.5))
            span = math.log10(hi) - math.log10(lo)
            def height(v):
                return max(0.0, (math.log10(max(v, lo)) - math.log10(lo)) / span * plot_h)
            ticks = [lo * 10 ** k for k in range(int(round(span)) + 1)]
        else:
            vmax = max(vals + ([ref_line * 1.15] if ref_line else [])) if vals else 1.0
            vmax = vmax * 1.12 or 1.0
            def height(v):
                return v / vmax * plot_h
            step = nice_step(vmax)
            ticks = [k * step for k in range(int(vmax / step + 1e-9) + 1)]
        for t in ticks:
            yy = bottom - height(t) if t > 0 or not log_scale else bottom
            out.append(f'<line x1="{left}" x2="{W - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="g"/>'
                       f'<text x="{left - 6}" y="{yy + 4:.1f}" class="t" text-anchor="end">{tick(t)}</text>')
        out.append(f'<text x="16" y="{(top + bottom) / 2:.0f}" class="t" text-anchor="middle" '
                   f'transform="rotate(-90 16 {(top + bottom) / 2:.0f})">{html.escape(ylabel)}</text>')
        if ref_line:
            yy = bottom - height(ref_line)
            out.append(f'<line x1="{left}" x2="{W - right}" y1="{yy:.1f}" y2="{yy:.1f}" class="ref"/>')
        n = max(len(groups), 1)
        gw = (W - left - right) / n
        for gi, (glabel, rows) in enumerate(groups):
            names = [s for s in servers if s in rows]
            bw = min(44, (gw - 20) / max(len(names), 1))
            gx = left + gi * gw + (gw - bw * len(names)) / 2
            for si, s in enumerate(names):
                v = value(rows[s])
                bx = gx + si * bw
                if v is None:
                    out.append(f'<text x="{bx + bw / 2:.1f}" y="{bottom - 4}" class="v" text-anchor="middle">n/a</text>')
                    continue
                h = height(v)
                out.append(f'<rect x="{bx + 2:.1f}" y="{bottom - h:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" '
                           f'fill="{COLORS.get(s, "#888")}"><title>{html.escape(s)}: {html.escape(label(rows[s]))}</title></rect>'
                           f'<text x="{bx + bw / 2:.1f}" y="{bottom - h - 4:.1f}" class="v" text-anchor="middle">'
                           f'{html.escape(short(v, ref_line))}</text>')
            out.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{bottom + 18}" class="t" text-anchor="middle">'
                       f'{html.escape(glabel)}</text>')
        out.append(f'<line x1="{left}" x2="{W - right}" y1="{bottom}" y2="{bottom}" class="a"/>')
        return out

    y = y0 + 20
    if summary["scenarios"]:
        groups = [(f'{sc["name"]} (best peer {fmt(sc["servers"].get(sc["best_peer"], {}).get("msgs_per_sec"))}/s)'
                   if sc["best_peer"] else sc["name"], sc["servers"]) for sc in summary["scenarios"]]
        parts += panel(y, "Echo throughput: messages/s relative to the best peer, dashed line (higher is better)", groups,
                       lambda r: r.get("ratio_to_best_peer"),
                       lambda r: f'{fmt(r["msgs_per_sec"])} msgs/s, p99 {fmt(r["p99_us"])} µs',
                       1.0, "× best peer")
        y += panel_h + gap_top
        groups = [(sc["name"], sc["servers"]) for sc in summary["scenarios"]]
        parts += panel(y, "Server CPU time per message relative to the best peer, dashed line (lower is better)", groups,
                       lambda r: r.get("cpu_ratio_to_best_peer"),
                       lambda r: f'{fmt(r["server_cpu_us_per_msg"], 2)} µs/msg',
                       1.0, "× best peer")
        y += panel_h + gap_top
    if summary.get("pubsub"):
        groups = [(sc["name"], sc["servers"]) for sc in summary["pubsub"]]
        parts += panel(y, "Pub/sub deliveries/s relative to the best pub/sub peer, dashed line (higher is better)",
                       groups, lambda r: r.get("ratio_to_best_peer"),
                       lambda r: f'{fmt(r["deliveries_per_sec"])} deliveries/s, p99 {fmt(r["p99_us"])} µs',
                       1.0, "× best peer")
        y += panel_h + gap_top
        parts += panel(y, "Pub/sub server CPU time per delivery relative to the best pub/sub peer (lower is better)",
                       groups, lambda r: r.get("cpu_ratio_to_best_peer"),
                       lambda r: f'{fmt(r["server_cpu_us_per_delivery"], 3)} µs/delivery',
                       1.0, "× best peer")
        y += panel_h + gap_top
    if summary["idle"]:
        conns = summary["idle"]["conns"]
        parts += panel(y, f"Idle server memory per connection at {fmt(conns)} connections, bytes (lower is better)",
                       [("RSS growth / connection", summary["idle"]["servers"])],
                       lambda r: r.get("bytes_per_conn"),
                       lambda r: f'{fmt(r["bytes_per_conn"])} B/conn', None, "bytes (log scale)",
                       log_scale=True)
        y += panel_h + gap_top
    H = y - gap_top + 10
    style = ("<style>text{font-family:sans-serif;fill:#222}.h{font-size:14px;font-weight:bold}"
             ".t{font-size:11px}.l{font-size:12px}.v{font-size:10px}.g{stroke:#e4e4e4}"
             ".a{stroke:#444}.ref{stroke:#222;stroke-dasharray:5 4}</style>")
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f'{style}<rect width="100%" height="100%" fill="#fff"/>'
            f'<text x="{left}" y="26" class="h" style="font-size:16px">{html.escape(title)}</text>')
    return head + "".join(legend) + "".join(parts) + "</svg>\n"


def nice_step(vmax):
    raw = vmax / 5
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def tick(t):
    if t >= 1e6:
        return f"{t / 1e6:g}M"
    if t >= 1000:
        return f"{t / 1000:g}k"
    return f"{t:g}"


def short(v, ratio):
    if ratio:
        return f"{v:.2f}"
    return f"{v:,.0f}"


# ----- command -----

def cmd_summarize(a):
    runs = load_runs(a.runs)
    summary = summarize(runs)
    machine = {}
    if a.machine_json and os.path.exists(a.machine_json):
        with open(a.machine_json, encoding="utf-8") as f:
            machine = json.load(f)
    eh, er, ih, ir = tables(summary)
    text = []
    if er:
        text += ["Echo (medians over rounds; × best peer = msgs/s ÷ the faster of "
                 + " / ".join(PEERS) + ")", text_table(eh, er), ""]
    if ir:
        text += [f"Idle memory per connection ({fmt(summary['idle']['conns'])} connections)", text_table(ih, ir, numeric_from=1), ""]
    ph, pr = pubsub_table(summary.get("pubsub"))
    if pr:
        text += ["Pub/sub (medians over rounds)", text_table(ph, pr), PUBSUB_NOTE, ""]
    sh, sr = slow_table(summary.get("slow"))
    if sr:
        slow = summary["slow"]
        text += [slow_title(slow) + f": {fmt(slow['size'])} B echo messages, {fmt(slow['flood_size'])} B flood messages; "
                 "medians over rounds, RSS growth the largest of any round", text_table(sh, sr, numeric_from=1), ""]
    probs = problems_text(summary)
    busy = busy_warning(machine)
    if busy:
        probs.insert(0, busy)
    if probs:
        text += ["Notes:"] + [f"  {p}" for p in probs] + [""]
    print("\n".join(text))

    os.makedirs(a.out, exist_ok=True)
    doc = {"command": a.command, "machine": machine, "peers": PEERS, "pubsub_peers": PUBSUB_PEERS, **summary}
    with open(os.path.join(a.out, "compare.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, sort_keys=False)
        f.write("\n")

    md = ["# websocket-driver vs peers: echo, pub/sub and idle-memory comparison", ""]
    md += [f"Command: `{a.command}`", ""]
    if machine:
        md += ["| machine | |", "|---|---|"]
        md += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in machine.items()]
        md.append("")
    md += ["Each server runs alone, pinned to CPU 0 (`taskset -c 0`, one thread/worker); `wsload` runs pinned "
           "to CPU 1. Servers are interleaved (" + ", ".join(SERVERS) + ", then again) for every round; "
           "each cell is the median over rounds. *× best peer* divides by the faster of "
           + " and ".join(PEERS) + " in the same scenario (for CPU/msg and memory: the leaner one). "
           "Server CPU is utime+stime from /proc/PID/stat over the measuring window (user · kernel: utime and stime apart); client CPU is wsload's "
           "share of its one core over its whole run (near 100% means the load generator, not the server, "
           "set the pace).", ""]
    if er:
        md += ["## Echo", "", md_table(eh, er), ""]
    if pr:
        md += ["## Pub/sub", "", PUBSUB_NOTE + " Server CPU µs/delivery is the server's CPU time in the "
               "measuring window ÷ deliveries in it (the pub/sub peers run their published defaults with a "
               "`tokio::sync::broadcast` channel per topic; see loadtest/README.md).", "", md_table(ph, pr), ""]
    if ir:
        md += [f"## Idle memory per connection ({fmt(summary['idle']['conns'])} connections)", "",
               "Server RSS growth (VmRSS after opening and holding the connections − before) ÷ connections held.", "",
               md_table(ih, ir, numeric_from=1), ""]
    if sr:
        slow = summary["slow"]
        md += [f"## {slow_title(slow)}", "",
               f"`wsload slow`: one connection sends {fmt(slow['flood_size'])}-byte binary messages as fast as the "
               f"socket takes them and never reads its echoes, while {fmt(slow['conns'])} normal connections run the "
               f"echo workload ({fmt(slow['size'])} B, one message in flight each). Normal msgs/s and p99 are medians over "
               "rounds; server RSS growth is the largest VmRSS − start seen (sampled every 100 ms) in any round; "
               "flooder bytes sent counts what its socket accepted (a few MiB of that can sit in kernel buffers "
               "without the server reading it); *flooder disconnected* means the server dropped it (a write "
               "failed), with the median time after it started flooding.", "",
               md_table(sh, sr, numeric_from=1), ""]
    if probs:
        md += ["## Notes", ""] + [f"- {p}" for p in probs] + [""]
    md += ["![chart](compare.svg)", ""]
    with open(os.path.join(a.out, "compare.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    title = "websocket-driver vs peers"
    if machine.get("date"):
        title += f" — {machine['date']}"
    with open(os.path.join(a.out, "compare.svg"), "w", encoding="utf-8") as f:
        f.write(svg_chart(summary, title))
    print(f"wrote {a.out}/compare.json, compare.md, compare.svg")


def cmd_selftest(_a):
    import random
    rng = random.Random(6)
    runs = []
    base = {"wsd-epoll": 1.3, "wsd-io-uring": 1.5, "tokio-tungstenite": 1.0, "fastwebsockets": 1.15}
    echo_servers = list(base)
    for name, conns, size, rate in [("100×20 B", 100, 20, 40000), ("10×1 KiB", 10, 1024, 30000),
                                    ("500×16 KiB", 500, 16384, 9000), ("1×1 MiB", 1, 1 << 20, 300)]:
        for rnd in range(1, 4):
            for s in echo_servers:
                mps = rate * base[s] * rng.uniform(0.95, 1.05)
                ok = not (s == "wsd-io-uring" and name == "1×1 MiB" and rnd == 2)
                runs.append({"kind": "echo", "server": s, "scenario": name, "round": rnd, "rc": 0 if ok else 1,
                             "ok": ok, **({} if ok else {"problems": ["wsload exit status 1"]}),
                             "cpu_basis": "window", "server_cpu_us_per_msg": 1e6 / mps * 0.7,
                             "server_cpu_util": 0.7, "client_cpu_util": 0.97,
                             "wsload": {"mode": "echo", "conns": conns, "size": size, "secs": 5,
                                        "messages": int(mps * 5), "msgs_per_sec": mps,
                                        "mb_per_sec": mps * size / 1e6, "p50_us": 900, "p99_us": 3000,
                                        "p999_us": 9000, "errors": 0}})
    for rnd in range(1, 4):
        for s, b in zip(echo_servers, [600, 700, 9000, 12000]):
            runs.append({"kind": "idle", "server": s, "scenario": "idle", "round": rnd, "rc": 0, "ok": True,
                         "wsload": {"mode": "idle", "conns": 10000, "held": 10000, "all_opened": True,
                                    "rss_before_kib": 2000, "rss_after_kib": 2000 + b * 10000 // 1024,
                                    "bytes_per_conn": b * rng.uniform(0.98, 1.02), "errors": 0}})
    for rnd in range(1, 4):
        for s in echo_servers:
            cap = s == "wsd-epoll" and rnd == 2
            died = s == "wsd-io-uring" and rnd == 3
            no_flooder = s == "tokio-tungstenite" and rnd == 1
            disc = s == "fastwebsockets"
            w = {"mode": "slow", "conns": 10, "size": 1024, "flood_size": 65536, "secs": 5,
                 "messages": 0 if died else 100000, "msgs_per_sec": 0.0 if died else 20000 * base[s],
                 "p50_us": 80, "p99_us": 4000, "p999_us": 9000, "errors": 10 if died else 0,
                 "server_rss_start_kib": 3000, "server_rss_growth_max_kib": 1030 * 1024 if cap else 2048 * rnd,
                 "server_gone": died, "rss_cap_hit": cap, "flooder_connected": not no_flooder,
                 "flooder_error": "refused" if no_flooder else None,
                 "flooder_bytes_sent": (1 << 30) if cap else 8 << 20, "flooder_last_progress_s": 0.2,
                 "flooder_disconnected": disc or died, "flooder_disconnected_at_s": 1.5 if disc else (2.0 if died else None)}
            rec = {"kind": "slow", "server": s, "scenario": "slow reader", "round": rnd, "rc": 0,
                   "ok": not no_flooder, "wsload": w}
            if no_flooder:
                rec["problems"] = ["the flooder did not connect: refused"]
            if died:
                rec["server_died"] = True
                rec["notes"] = ["10 errors on the normal clients", "server died during the run"]
            if cap:
                rec["notes"] = ["server RSS grew past wsload's cap (1030 MiB): flooder stopped early"]
            runs.append(rec)
    ps_servers = ["wsd-epoll", "wsd-io-uring"] + PUBSUB_PEERS
    ps_base = {"wsd-epoll": 2.0, "wsd-io-uring": 2.2, "pubsub-tungstenite": 1.0, "pubsub-fastwebsockets": 1.2}
    for name, kind, n in [("broadcast 100", "broadcast", 100), ("fanout 1→10000 @ 20/s", "fanout", 10000)]:
        for rnd in range(1, 4):
            for s in ps_servers:
                if kind == "broadcast":
                    dps = 1e6 * ps_base[s] * rng.uniform(0.95, 1.05)
                    w = {"mode": kind, "conns": n, "size": 20, "deliveries_per_sec": dps,
                         "rounds_per_sec": dps / n / n, "deliveries": int(dps * 5)}
                else:
                    dps = 2e5 * rng.uniform(0.99, 1.0)
                    w = {"mode": kind, "subs": n, "rate": 20, "deliveries_per_sec": dps, "deliveries": int(dps * 5)}
                lagged = kind == "fanout" and s == "pubsub-tungstenite" and rnd == 2
                w.update({"secs": 5, "msgs_per_sec": dps, "p50_us": 500, "p99_us": 2000, "p999_us": 3000,
                          "missing": 1234 if lagged else 0, "stalled": False, "errors": 0})
                rec = {"kind": kind, "server": s, "scenario": name, "round": rnd, "rc": 0, "ok": True,
                       "cpu_basis": "window", "server_cpu_us_per_msg": 1e6 / dps * 0.8 / ps_base[s],
                       "server_cpu_util": 0.8, "client_cpu_util": 0.5, "wsload": w}
                if lagged:
                    rec["notes"] = ["1234 deliveries missing"]
                runs.append(rec)
    d = tempfile.mkdtemp(prefix="wsd-report-")
    path = os.path.join(d, "runs.jsonl")
    with open(path, "w") as f:
        for r in runs:
            f.write(json.dumps(r) + "\n")
    machine = os.path.join(d, "machine.json")
    with open(machine, "w") as f:
        json.dump({"date": "selftest", "nproc": 2}, f)
    cmd_summarize(argparse.Namespace(runs=path, out=d, command="report.py selftest", machine_json=machine))
    doc = json.load(open(os.path.join(d, "compare.json")))
    assert doc["scenarios"][0]["best_peer"] == "fastwebsockets", doc["scenarios"][0]["best_peer"]
    r = doc["scenarios"][0]["servers"]["wsd-io-uring"]["ratio_to_best_peer"]
    assert 1.1 < r < 1.5, r
    assert doc["idle"]["best_peer"] == "tokio-tungstenite"
    slow = doc["slow"]["servers"]
    assert slow["wsd-epoll"]["rss_growth_max_mib"] == 1030, slow["wsd-epoll"]
    assert slow["wsd-epoll"]["rss_cap_hit_runs"] == 1 and slow["wsd-epoll"]["ok_runs"] == 3
    assert slow["wsd-io-uring"]["server_died_runs"] == 1 and slow["wsd-io-uring"]["ok_runs"] == 3
    assert slow["fastwebsockets"]["flooder_disconnected_runs"] == 3
    assert slow["tokio-tungstenite"]["ok_runs"] == 2 and slow["tokio-tungstenite"]["problems"]
    ps = {sc["name"]: sc for sc in doc["pubsub"]}
    assert ps["broadcast 100"]["best_peer"] == "pubsub-fastwebsockets", ps["broadcast 100"]["best_peer"]
    r = ps["broadcast 100"]["servers"]["wsd-io-uring"]["ratio_to_best_peer"]
    assert 1.6 < r < 2.1, r
    assert ps["fanout 1→10000 @ 20/s"]["servers"]["pubsub-tungstenite"]["missing"] == 1234
    assert ps["fanout 1→10000 @ 20/s"]["servers"]["pubsub-tungstenite"]["ok_runs"] == 3
    assert ps["fanout 1→10000 @ 20/s"]["servers"]["wsd-epoll"]["rounds_per_sec"] is None
    md = open(os.path.join(d, "compare.md"), encoding="utf-8").read()
    assert "## Pub/sub" in md and "| broadcast 100 | wsd-io-uring |" in md, md
    assert "## Slow reader (one non-reading flooder + 10 echo clients)" in md
    assert "| wsd-io-uring (died in 1 of 3) |" in md, md
    assert "| fastwebsockets | " in md and "| yes (1.5 s) |" in md
    import xml.dom.minidom
    xml.dom.minidom.parse(os.path.join(d, "compare.svg"))  # well-formed
    print(f"selftest ok: {d}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--kind", choices=["echo", "idle", "slow", "broadcast", "fanout"], required=True)
    r.add_argument("--server", required=True)
    r.add_argument("--scenario", required=True)
    r.add_argument("--round", type=int, required=True)
    r.add_argument("--json", required=True, help="wsload's stdout")
    r.add_argument("--samples", help="progress samples: EPOCHREALTIME TICKS LINE")
    r.add_argument("--cpu-before", type=int, default=-1)
    r.add_argument("--cpu-after", type=int, default=-1)
    r.add_argument("--clk-tck", type=int, default=100)
    r.add_argument("--client-cpu-s", type=float, default=-1)
    r.add_argument("--wall-s", type=float, default=0)
    r.add_argument("--rc", type=int, default=0)
    r.add_argument("--server-exited", action="store_true")
    s = sub.add_parser("summarize")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--command", default="")
    s.add_argument("--machine-json")
    sub.add_parser("selftest")
    a = p.parse_args()
    {"record": cmd_record, "summarize": cmd_summarize, "selftest": cmd_selftest}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
