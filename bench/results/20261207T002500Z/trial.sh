#!/bin/bash
# one failover trial by hand, inside the lab
B=/work/xwt/bin/govmm
P=$($B image build --print 2>/dev/null)
bzImage=$(echo "$P" | sed -n 1p); initrd=$(echo "$P" | sed -n 2p)
echo "image: $bzImage $initrd"; [ -n "$initrd" ] || exit 1
D=/work/xwt/folog; rm -rf $D/*
echo -n govmm-bench-failover-key-0123456 > $D/key; chmod 600 $D/key
truncate -s 64M $D/d0 $D/d1
export GOVMM_LOG=info
mount -t debugfs none /sys/kernel/debug 2>/dev/null
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
C="--failover-timeout 3s --key-file $D/key --name fo"
$B standby --listen 127.0.0.1:7000 --net user --publish 127.0.0.1:8081:80 --disk $D/d1 $C > $D/sb.log 2>&1 &
SB=$!
sleep 3
$B run --kernel $bzImage --initrd $initrd --replicate-to 127.0.0.1:7000 --net user --publish 127.0.0.1:8080:80 --disk $D/d0 $C > $D/pr.log 2>&1 &
PR=$!
echo "primary started $(date +%T)"
for i in $(seq 600); do grep -q "protected by" $D/pr.log && break; sleep 0.5; done
echo "protected $(date +%T)"; timeout 300 /work/xwt/bin/foclient wait http://127.0.0.1:8080/healthz
/work/xwt/bin/foclient post http://127.0.0.1:8080/incr
echo "KILL at $(date +%H:%M:%S.%6N)"
kill -9 $PR
stats() { for d in /sys/kernel/debug/kvm/$SB-*; do [ -d $d ] || continue; echo "$1 $d: $(for f in exits pf_fixed pf_taken pf_guest pf_spurious pf_mmio_spte_created mmu_pde_zapped nx_lpage_splits pages_4k pages_2m pages_1g halt_exits io_exits mmio_exits; do [ -f $d/$f ] && echo -n "$f=$(cat $d/$f) "; done)"; done; grep -E "AnonHuge|^Rss" /proc/$SB/smaps_rollup | tr '\n' ' '; echo; }
for i in $(seq 100); do grep -q "took over" $D/sb.log && break; sleep 0.05; done
stats after-takeover
timeout 120 /work/xwt/bin/foclient poll http://127.0.0.1:8081/healthz
stats after-answers
/work/xwt/bin/foclient post http://127.0.0.1:8081/incr
stats after-20-posts
grep -E "TRACE|took over|lost" $D/sb.log
echo ---; tail -5 $D/pr.log
kill $SB; wait
