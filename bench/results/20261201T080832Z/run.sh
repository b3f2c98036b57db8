#!/bin/sh
# interleaved rounds: each binary runs BenchmarkAck in turn
cd /work/wt/s21-stream/replicate/stream
rounds=${1:-3}; shift
for r in $(seq 1 $rounds); do
  for b in "$@"; do
    echo "== round $r $b $(cat /proc/loadavg)"
    nice -n 5 /work/wt/s21-stream/bin/ack_$b.test -test.run XXX -test.bench '^BenchmarkAck$' -test.benchtime 1s 2>&1 | grep -E '^BenchmarkAck'
  done
done
