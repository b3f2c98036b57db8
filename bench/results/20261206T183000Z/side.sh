#!/bin/sh
# side-by-side: old (251cdc4) and new (HEAD) alternating on this host's KVM
cd /work/main/replicate
for r in 1 2 3 4 5; do
  for v in old new; do
    echo "== round $r $v epoch"
    if [ $v = old ]; then pat='BenchmarkEpochState$'; else pat='BenchmarkEpochState/pages=64$'; fi
    /work/prof/rep-$v.test -test.run XXX -test.bench "$pat" -test.benchtime 2000x 2>&1 | grep Benchmark
    echo "== round $r $v encode"
    (cd ../vmm && /work/prof/vmm-$v.test -test.run XXX -test.bench 'BenchmarkEncodeState$' -test.benchtime 3000x 2>&1 | grep Benchmark)
  done
done
