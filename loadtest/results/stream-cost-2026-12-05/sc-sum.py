import sys, statistics as st
rows=[l.split() for l in open(__import__('os').environ.get('OUT', '/tmp/sc-ab.out'))]
for b in sys.argv[1:]:
    r=[float(x[3]) for x in rows if x[0]==b]
    if not r:
        continue
    w=[float(x[1]) for x in rows if x[0]==b]; f=[float(x[2]) for x in rows if x[0]==b]
    print(f"{b}: n={len(r)} ratio median {st.median(r):.3f} mean {st.mean(r):.3f}; wsd median {st.median(w):.1f} ns, fws median {st.median(f):.1f} ns")
