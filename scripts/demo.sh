#!/usr/bin/env bash
# govmm demo: a primary replicating to a standby on this machine, the
# primary SIGKILLed, the standby carrying on.
#
# On a host whose KVM runs guests at hardware speed this is meant to boot
# the default guest and drive its HTTP service from a client that keeps one
# TCP connection across the failover (TAPs on a bridge in a network
# namespace). On hosts whose KVM emulates every instruction (kvm_pvm) Linux
# cannot boot in reasonable time, so the demo runs a tiny hand-assembled
# guest that dirties memory and counts, and shows the same mechanics: the
# checkpoints, the failover time, and the guest's counter going on.
set -euo pipefail
cd "$(dirname "$0")/.."
GOVMM=${GOVMM:-bin/govmm}
work=$(mktemp -d /tmp/govmm-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 -- "-$p" 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [[ -e /sys/module/kvm_pvm ]]; then
	say "KVM here is kvm_pvm: it emulates guests (~3 µs per instruction); using the tiny guest"
	go run ./internal/tinyguest/cmd/mkdirtier -out "$work/guest" -pages 256
	guest=(--kernel "$work/guest" --initrd "$work/guest" --mem 64M --net none)
else
	say "hardware KVM: booting the default guest"
	"$GOVMM" image build >/dev/null
	guest=(--net none)
fi

port=$((20000 + RANDOM % 20000))
say "standby: govmm standby --listen 127.0.0.1:$port"
setsid "$GOVMM" standby --listen "127.0.0.1:$port" --net none --api-sock "$work/standby.sock" 2>"$work/standby.log" &
pids+=($!)
sleep 0.3

say "primary: govmm run --replicate-to 127.0.0.1:$port --epoch 25ms"
setsid "$GOVMM" run "${guest[@]}" --api-sock "$work/primary.sock" --replicate-to "127.0.0.1:$port" --epoch 25ms \
	</dev/null >"$work/primary.out" 2>"$work/primary.log" &
primary=$!
pids+=($primary)
disown "$primary" # no job-control chatter when it is killed
for _ in $(seq 300); do
	"$GOVMM" ctl --api-sock "$work/primary.sock" info 2>/dev/null | grep -q protected && break
	sleep 0.1
done
"$GOVMM" ctl --api-sock "$work/primary.sock" info
sleep 2
say "checkpoint statistics after 2 s"
"$GOVMM" ctl --api-sock "$work/primary.sock" stats | grep -E 'replication|output_held' || true
"$GOVMM" ctl --api-sock "$work/primary.sock" snapshot --out "$work/before.snap" >/dev/null

say "SIGKILL the primary"
start=$(date +%s%N)
kill -9 -- "-$primary"
for _ in $(seq 3000); do
	[[ -S "$work/standby.sock" ]] && "$GOVMM" ctl --api-sock "$work/standby.sock" info >/dev/null 2>&1 && break
	sleep 0.005
done
end=$(date +%s%N)
printf 'standby answering %d ms after the SIGKILL\n' $(((end - start) / 1000000))
grep -h "took over" "$work/standby.log" || true
"$GOVMM" ctl --api-sock "$work/standby.sock" info
sleep 0.5
"$GOVMM" ctl --api-sock "$work/standby.sock" snapshot --out "$work/after.snap" >/dev/null
go run ./internal/tinyguest/cmd/mkdirtier -counter "$work/before.snap" -counter2 "$work/after.snap" 2>/dev/null || true
say "done"
