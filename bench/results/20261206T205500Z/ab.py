# Old against new binary, BenchmarkCheckpointCopy (cow, pre-harvest), in
# rounds (ab.txt): each run's medians, then the median over the runs.
import re, sys, statistics as st
d = {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else 'ab.txt'):
    rnd, b = re.search(r'round=(\S+) bin=(\S+)', line).groups()
    pages = int(re.search(r'pages=(\d+)', line).group(1))
    m = dict((k, float(v)) for v, k in re.findall(r'([\d.]+) (pause-µs|stop-µs)', line))
    d.setdefault((pages, b), []).append((rnd, m['stop-µs'], m['pause-µs']))
for pages in sorted({k[0] for k in d}):
    o, n = d[(pages, 'old')], d[(pages, 'new')]
    wins = sum(1 for x, y in zip(o, n) if y[1] < x[1])
    print('%6d pages: stop %4.0f -> %4.0f µs, pause %4.0f -> %4.0f µs (%d runs each; new stopped shorter in %d)' % (
        pages, st.median(x[1] for x in o), st.median(x[1] for x in n),
        st.median(x[2] for x in o), st.median(x[2] for x in n), len(o), wins))
