# The quick checkpoint bench, old and new binaries in turn (quick/*.csv):
# each run's median stop step per row, sparse pages.
import csv, glob, statistics as st, sys
d = sys.argv[1] if len(sys.argv) > 1 else 'quick'
for key in [(100, 'stop'), (100, 'auto'), (1000, 'auto'), (100, 'cow'), (1000, 'cow'), (4096, 'cow'), (65536, 'cow'), (65536, 'auto')]:
    for b in ['old', 'new']:
        runs = []
        for f in sorted(glob.glob('%s/%s_*.csv' % (d, b))):
            v = [x for x in csv.DictReader(open(f)) if x['content'] == 'sparse'
                 and int(x['nominal_pages']) == key[0] and x['copy'] == key[1]]
            runs.append('%.0f' % st.median(float(y['stop_us']) for y in v))
        print('%6d %-4s %s stop per run (µs): %s' % (key[0], key[1], b, ' '.join(runs)))
