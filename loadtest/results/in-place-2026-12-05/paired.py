import sys
rows=[l.split() for l in open(sys.argv[1]) if l[0].isdigit()]
a,b=sys.argv[2],sys.argv[3]
by={}
for r in rows: by.setdefault(r[0],{})[r[1]]=list(map(float,r[2:]))
for i,name in [(0,'msgs/s'),(1,'user'),(2,'kernel'),(3,'total')]:
    lower=sum(1 for v in by.values() if v[b][i]<v[a][i])
    print(f"{name}: {b} below {a} in {lower} of {len(by)} rounds")
