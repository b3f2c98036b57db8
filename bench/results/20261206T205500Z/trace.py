# Medians per (pages, variant, round) of trace.txt: the stop step, kick to
# KVM_RUN's return, and the pause's other steps. Skips each run's first
# three checkpoints (warm-up) and stop-and-copy ones.
import re, sys, statistics as st
rows = {}
for line in open(sys.argv[1] if len(sys.argv) > 1 else 'trace.txt'):
    f = dict(re.findall(r'(\S+?)=(-?\w+)', line))
    if f['mode'] != 'cow':
        continue
    rows.setdefault((int(f['pages']), f['variant'], int(f['round'])), []).append(f)
print('pages variant round n stop kick-exit exit-answer')
for k in sorted(rows):
    v = rows[k][3:]
    med = lambda c: st.median(int(x[c]) for x in v)
    print(k[0], k[1], k[2], len(v), med('stop'), med('kick-runret'), med('runret-reply'))
