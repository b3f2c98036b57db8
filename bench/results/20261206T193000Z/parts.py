import csv, sys, statistics as st
ws = int(sys.argv[1]); mode = sys.argv[2]
for path in sys.argv[3:]:
    rows = [r for r in csv.DictReader(open(path)) if r['content']=='sparse' and r['stream']=='none' and int(r['nominal_pages'])==ws and r['copy']==mode]
    f = lambda c: st.median(float(r[c]) for r in rows)
    print(path, ' '.join('%s %.0f' % (c, f(c)) for c in ['pause_us','stop_us','harvest_us','copy_us','state_us','rest_us']))
