import csv, sys, statistics as st
for path in sys.argv[1:]:
    rows = list(csv.DictReader(open(path)))
    groups = {}
    for r in rows:
        if r.get('content','sparse') != 'sparse': continue
        k = (int(r['nominal_pages']), r['copy'], r['stream'])
        groups.setdefault(k, []).append((float(r['stop_us']), float(r['pause_us'])))
    print('==', path)
    tot_big = 0; n = 0
    for k in sorted(groups):
        v = groups[k]; s = sorted(x[0] for x in v); p = sorted(x[1] for x in v)
        big = sum(1 for x in s if x > 1500); tot_big += big; n += len(s)
        if k[1].startswith('cow') or k[1].startswith('auto'):
            print(k, 'stop med %.0f p90 %.0f max %.0f  >1.5ms %d/%d  pause med %.0f max %.0f' % (st.median(s), s[int(0.9*(len(s)-1))], s[-1], big, len(s), st.median(p), p[-1]))
    print('stops > 1.5 ms: %d of %d' % (tot_big, n))
