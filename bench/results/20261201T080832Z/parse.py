import sys, re, statistics as st, collections
# bin -> key -> list of (stream ms, bound ms, stream cpu, bound cpu)
data = collections.defaultdict(lambda: collections.defaultdict(list))
cur = None; pending = {}; loads = []
for line in open(sys.argv[1]):
    m = re.match(r'== round (\d+) (\S+) (\S+)', line)
    if m:
        cur = m.group(2); loads.append(float(m.group(3))); continue
    m = re.match(r'BenchmarkAck/(\w+)/(stream|bound)-(\d+)-\d+\s', line)
    if m:
        mode, kind, n = m.group(1), m.group(2), int(m.group(3))
        ms = float(re.search(r'([\d.]+) ms/ack', line).group(1))
        c = re.search(r'([\d.]+) cpu-ms/ack', line)
        cpu = float(c.group(1)) if c else float('nan')
        key = (mode, n)
        if kind == 'stream': pending[(cur, key)] = (ms, cpu)
        else:
            sm, sc = pending.pop((cur, key)); data[cur][key].append((sm, ms, sc, cpu))
bins = list(data)
agg = sys.argv[2] if len(sys.argv) > 2 else 'median'
f = st.median if agg == 'median' else min
print("load average (1 min) at the rounds' starts: min %.1f median %.1f max %.1f; %s of the rounds" % (min(loads), st.median(loads), max(loads), agg))
print("mode pages | " + " | ".join("%s: stream, bound, ratio; cpu stream/bound" % b for b in bins) + " | n")
for key in sorted(data[bins[0]], key=lambda k: (k[0] != 'keyed', k[1])):
    cells = []
    for b in bins:
        v = data[b].get(key, [])
        if not v: cells.append("-"); continue
        s = f([x[0] for x in v]); bd = f([x[1] for x in v]); r = f([x[0]/x[1] for x in v])
        c = f([x[2]/x[3] for x in v]); sc = f([x[2] for x in v]); bc = f([x[3] for x in v])
        cells.append("%.2f ms, %.2f ms, %.2fx; cpu %.2f / %.2f ms = %.2fx" % (s, bd, r, sc, bc, c))
    print("%s %d | %s | %d" % (key[0], key[1], " | ".join(cells), len(data[bins[0]][key])))
