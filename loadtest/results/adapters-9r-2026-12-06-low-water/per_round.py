import json,sys,collections
rows=[json.loads(l) for l in open(sys.argv[1])]
by=collections.defaultdict(dict)
for r in rows:
    if not r.get('ok'): continue
    by[(r['scenario'],r['round'])][r['server']]=r
scen=sorted(set(k[0] for k in by), key=lambda s: list(by).index(next(k for k in by if k[0]==s)))
for s in scen:
    for srv in ['echo_tokio','echo_hyper']:
        n=ahead=cpu=0; ratios=[]
        for (sc,rd),d in sorted(by.items()):
            if sc!=s or srv not in d or 'fastwebsockets' not in d: continue
            a=d[srv]['wsload']['msgs_per_sec']; f=d['fastwebsockets']['wsload']['msgs_per_sec']
            n+=1; ahead+= a>=f; cpu+= d[srv]['server_cpu_us_per_msg']<=d['fastwebsockets']['server_cpu_us_per_msg']
            ratios.append(a/f)
        if n:
            rs=sorted(ratios)
            print(f"{s} | {srv} | {ahead} of {n} | {cpu} of {n} | median {rs[len(rs)//2]:.2f} | "+" ".join(f"{x:.2f}" for x in ratios))
