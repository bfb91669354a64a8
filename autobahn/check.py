#!/usr/bin/env python3
"""Judge an Autobahn report against the project's bar.

usage: check.py REPORT_DIR

Sections 1-10 must be exactly 301 cases, each OK or INFORMATIONAL with a clean close
(no NON-STRICT, no FAILED). Sections 12-13 (permessage-deflate) must be UNIMPLEMENTED
until the extension lands. Exits non-zero otherwise.
"""
import collections
import json
import os
import sys

report_dir = sys.argv[1]
with open(os.path.join(report_dir, "index.json")) as f:
    report = json.load(f)
ok = bool(report)
for agent, cases in sorted(report.items()):
    core = {k: c for k, c in cases.items() if int(k.split(".")[0]) <= 10}
    deflate = {k: c for k, c in cases.items() if int(k.split(".")[0]) in (12, 13)}
    key = lambda k: tuple(int(p) for p in k.split("."))
    bad_core = sorted((k for k, c in core.items()
                       if c["behavior"] not in ("OK", "INFORMATIONAL")
                       or c["behaviorClose"] not in ("OK", "INFORMATIONAL")), key=key)
    bad_deflate = sorted((k for k, c in deflate.items() if c["behavior"] != "UNIMPLEMENTED"), key=key)
    counts = collections.Counter(c["behavior"] for c in core.values())
    print(f"{agent}: sections 1-10: {len(core)} cases {dict(sorted(counts.items()))}; "
          f"failing {len(bad_core)}: {' '.join(bad_core[:40])}")
    if deflate:
        print(f"{agent}: sections 12-13: {len(deflate)} cases, not UNIMPLEMENTED: {len(bad_deflate)} {' '.join(bad_deflate[:20])}")
    if len(core) != 301 or bad_core or bad_deflate:
        ok = False
sys.exit(0 if ok else 1)
