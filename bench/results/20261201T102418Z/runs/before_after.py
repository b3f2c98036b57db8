# Before/after medians over runs/ack_<build>-<n>.csv: python3 before_after.py runs
import csv, sys, glob, statistics as st, os, collections
base = sys.argv[1]
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for b in ['before', 'after']:
    for f in sorted(glob.glob(os.path.join(base, "ack_" + b + "-*.csv"))):
        d = f
        pend = {}
        for r in csv.DictReader(open(f)):
            key = (r['mode'], int(r['pages']), int(r['gap_ms']))
            k2 = (d, key, r['round'])
            if r['kind'] == 'stream':
                pend[k2] = r
            else:
                s = pend.pop(k2)
                rows[b][key].append((float(s['wall_ms_per_ack']), float(r['wall_ms_per_ack']), float(s['cpu_ms_per_ack']), float(r['cpu_ms_per_ack'])))
def q(xs, p):
    xs = sorted(xs); pos = p*(len(xs)-1); lo = int(pos); hi = min(lo+1, len(xs)-1)
    return xs[lo] + (xs[hi]-xs[lo])*(pos-lo)
print("| mode | dirty pages | gap | build | stream ms/ack | bound ms/ack | ratio median (p25–p75) | stream CPU ms/ack | bound CPU ms/ack | CPU ratio | rounds |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for key in sorted(rows['after'], key=lambda k: (k[0] != 'keyed', k[2], k[1])):
    for b in ['before', 'after']:
        v = rows[b].get(key, [])
        if not v: continue
        r = [x[0]/x[1] for x in v]; c = [x[2]/x[3] for x in v]
        print("| %s | %d | %d ms | %s | %.2f | %.2f | %.2f× (%.2f–%.2f) | %.2f | %.2f | %.2f× | %d |" % (key[0], key[1], key[2], b,
            st.median([x[0] for x in v]), st.median([x[1] for x in v]), st.median(r), q(r, .25), q(r, .75),
            st.median([x[2] for x in v]), st.median([x[3] for x in v]), st.median(c), len(v)))
