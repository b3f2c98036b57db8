import csv, sys, statistics as st
res = {}
for path in sys.argv[1:]:
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        if r['content'] != 'sparse' or r['stream'] != 'none': continue
        k = (int(r['nominal_pages']), r['copy'])
        res.setdefault(k, {}).setdefault(path, []).append(float(r['pause_us']))
names = sys.argv[1:]
print('set copy | ' + ' | '.join(n.split('/')[-1] for n in names) + '   (pause median / p90 µs)')
for k in sorted(res):
    out = []
    for n in names:
        v = sorted(res[k].get(n, []))
        out.append('%5.0f/%5.0f' % (st.median(v), v[int(0.9*(len(v)-1))]) if v else '-')
    print(k, ' | '.join(out))
