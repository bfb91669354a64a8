import sys, re, statistics, collections
rows = collections.defaultdict(list)
order = []
for line in open(sys.argv[1]):
    m = re.match(r'r\d+ (\S+)\s+(\d+) x (\d+)\s+(\d+) msgs/s\s+([\d.]+) us/msg\s+load ([\d.]+)', line)
    if not m: continue
    name, conns, size, mps, cpu, load = m.groups()
    key = (int(conns), int(size))
    if (key, name) not in rows: order.append((key, name))
    rows[(key, name)].append((int(mps), float(cpu), float(load)))
ref = sys.argv[2] if len(sys.argv) > 2 else 'fastws'
print('| scenario | server | msgs/s (median) | × %s | server CPU µs/msg (median) | CPU × %s | rounds | load avg |' % (ref, ref))
print('|---|---|---:|---:|---:|---:|---:|---:|')
for key in sorted(set(k for k, _ in order)):
    r = rows.get((key, ref))
    rm = statistics.median(x[0] for x in r) if r else None
    rc = statistics.median(x[1] for x in r) if r else None
    for k, name in order:
        if k != key: continue
        v = rows[(k, name)]
        mps = statistics.median(x[0] for x in v); cpu = statistics.median(x[1] for x in v)
        load = statistics.median(x[2] for x in v)
        sc = '%d×%s' % (key[0], ('%d B' % key[1]) if key[1] < 1024 else ('%d KiB' % (key[1]//1024) if key[1] < 1<<20 else '%d MiB' % (key[1]>>20)))
        print('| %s | %s | %s | %s | %.2f | %s | %d | %.2f |' % (sc, name, format(int(mps), ','), '%.2f×' % (mps/rm) if rm else '-', cpu, '%.2f×' % (cpu/rc) if rc else '-', len(v), load))
