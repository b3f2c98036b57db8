#!/bin/sh
# Interleaved: before (main at 136144c, with this branch's bench/ack*.go,
# SendPage in place of SendStablePage), after (this branch), before, after:
# each a full `govmm bench ack` into $out/<build>-<round>.
out=$1; rounds=${2:-2}
mkdir -p $out
for r in $(seq 1 $rounds); do
  for b in before after; do
    echo "== $r $b $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/runs.txt
    /tmp/ack/govmm-$b bench --out $out/$b-$r ack > $out/$b-$r.log 2>&1
  done
done
