#!/usr/bin/env python3
"""Judge an Autobahn report against the project's bar.

usage: check.py REPORT_DIR [--expect N] [--record FILE]

Every case must be OK or INFORMATIONAL with a clean close: no NON-STRICT, no FAILED, no
UNIMPLEMENTED (sections 12-13, permessage-deflate, included). With --expect N the report
must hold exactly N cases (517 for the full suite, 301 for sections 1-10). Prints one line
per agent with the counts per behavior and per section group. Exits non-zero otherwise.
With --record FILE the same lines (and the verdict) are written to FILE: the counts the
project keeps in autobahn/results/ (the HTML report itself is not kept).
"""
import collections
import json
import os
import sys

args = sys.argv[1:]
expect = None
if "--expect" in args:
    i = args.index("--expect")
    expect = int(args[i + 1])
    del args[i:i + 2]
record = None
if "--record" in args:
    i = args.index("--record")
    record = args[i + 1]
    del args[i:i + 2]
report_dir = args[0]
lines = []
with open(os.path.join(report_dir, "index.json")) as f:
    report = json.load(f)
ok = bool(report)
key = lambda k: tuple(int(p) for p in k.split("."))
for agent, cases in sorted(report.items()):
    bad = sorted((k for k, c in cases.items()
                  if c["behavior"] not in ("OK", "INFORMATIONAL")
                  or c["behaviorClose"] not in ("OK", "INFORMATIONAL")), key=key)
    counts = collections.Counter(c["behavior"] for c in cases.values())
    core = sum(1 for k in cases if int(k.split(".")[0]) <= 10)
    deflate = sum(1 for k in cases if int(k.split(".")[0]) in (12, 13))
    lines.append(f"{agent}: {len(cases)} cases (1-10: {core}, 12-13: {deflate}) "
                 f"{dict(sorted(counts.items()))}; failing {len(bad)}: {' '.join(bad[:40])}")
    if bad or (expect is not None and len(cases) != expect):
        ok = False
        if expect is not None and len(cases) != expect:
            lines.append(f"{agent}: expected {expect} cases, found {len(cases)}")
lines.append("verdict: " + ("pass" if ok else "FAIL"))
print("\n".join(lines))
if record:
    os.makedirs(os.path.dirname(record) or ".", exist_ok=True)
    with open(record, "w") as f:
        f.write("\n".join(lines) + "\n")
sys.exit(0 if ok else 1)
