# Per kind, the median time of each event after the checkpoint's (or
# transfer's) start, and each ack's time: from the throwaway trace's
# "T <ns> <pid> <event>" lines (CLOCK_MONOTONIC, both processes).
import sys, statistics as st, collections
ev = sorted((int(t), e.strip()) for _, t, _, e in (l.split(None, 3) for l in open(sys.argv[1]) if l.startswith('T ')))
kind, cur, cycles = None, None, []
for t, e in ev:
    if e.startswith('kind '):
        kind = e[5:]
        continue
    if e in ('s.begin', 'b.begin'):
        cur = {'kind': kind, 't0': t, 'ev': []}
        cycles.append(cur)
    if cur is not None:
        cur['ev'].append(((t - cur['t0']) / 1000, e))
    if e in ('s.ack', 'b.ack'):
        cur = None
by = collections.defaultdict(lambda: collections.defaultdict(list))
for c in cycles:
    seen = collections.Counter()
    for dt, e in c['ev']:
        seen[e] += 1
        by[c['kind']][e if seen[e] == 1 else '%s#%d' % (e, seen[e])].append(dt)
q = lambda v, f: sorted(v)[int(f * (len(v) - 1))]
for k, evs in by.items():
    print('==', k)
    for name, v in sorted(evs.items(), key=lambda kv: st.median(kv[1])):
        if len(v) >= len(evs['s.begin' if k == 'stream' else 'b.begin']) // 2:
            print('  %-20s n=%3d  median %6.0f µs  p10 %6.0f  p90 %6.0f' % (name, len(v), st.median(v), q(v, .1), q(v, .9)))
