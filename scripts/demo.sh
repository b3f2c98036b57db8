#!/usr/bin/env bash
# govmm demo: the default Linux guest replicated from a primary to a hot
# standby on this machine, a client driving its HTTP service over one
# keep-alive TCP connection, the primary SIGKILLed, the standby carrying
# on with the same connection; then what the client saw.
#
# The network is real and stays on this machine: a namespace "govmm-demo"
# with a bridge (the client's address, 10.77.0.1), one TAP for each VMM on
# it, the guest at 10.77.0.2. A witness (govmm witness) arbitrates, as it
# should in production: the primary's output leaves under its lease and
# the standby takes over only after winning the next generation there. Where this host's KVM cannot boot Linux
# (kvm_pvm, a cloud VM without nested virtualization) it all runs inside
# the lab (govmm lab: nested KVM under QEMU), slowly: the lab emulates
# everything, so its times are not what hardware gives.
#
# Usage: scripts/demo.sh   (make demo builds what it needs first)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
GOVMM=$root/bin/govmm
CLIENT=$root/bin/democlient
# Lab-friendly settings (see docs/ARCHITECTURE.md, "Choosing epoch and
# timeout"): checkpoints of a booting guest take long there.
EPOCH=${EPOCH:-25ms}
TIMEOUT=${FAILOVER_TIMEOUT:-3s}
KILL_AFTER=${KILL_AFTER:-8}

if [[ ${1:-} != --inside ]]; then
	go build -o "$GOVMM" ./cmd/govmm
	go build -o "$CLIENT" ./internal/democlient/cmd/democlient
	"$GOVMM" image build >/dev/null
	exec "$GOVMM" lab --if-needed -- "$root/scripts/demo.sh" --inside
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
ns=govmm-demo
work=$(mktemp -d /tmp/govmm-demo.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
# ip netns exec execs the command, so $! of "ip netns exec ... &" is the
# VMM itself (a shell function in between would not be).

say "network: namespace $ns, bridge br0 (client 10.77.0.1), tapP and tapS for the two VMMs"
ip netns del "$ns" 2>/dev/null || true
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 10.77.0.1/24 dev br0
ip -n "$ns" link set br0 up
for t in tapP tapS; do
	ip -n "$ns" tuntap add dev "$t" mode tap vnet_hdr
	ip -n "$ns" link set "$t" master br0 up
done
truncate -s 128M "$work/disk.img"
head -c 32 /dev/urandom | base64 >"$work/psk" && chmod 600 "$work/psk"

say "witness: govmm witness --listen 127.0.0.1:7100 --key-file psk --state witness/"
ip netns exec "$ns" "$GOVMM" witness --listen 127.0.0.1:7100 --key-file "$work/psk" --state "$work/witness" \
	</dev/null >"$work/witness.log" 2>&1 &
pids+=($!)
until grep -q 'listening on' "$work/witness.log" 2>/dev/null; do sleep 0.1; done
cp --sparse=always "$work/disk.img" "$work/standby.img"

say "standby: govmm standby --listen 127.0.0.1:7000 --key-file psk --witness 127.0.0.1:7100 --net tap:tapS --disk standby.img"
ip netns exec "$ns" "$GOVMM" standby --listen 127.0.0.1:7000 --key-file "$work/psk" --witness 127.0.0.1:7100 \
	--net tap:tapS --disk "$work/standby.img" --failover-timeout "$TIMEOUT" --witness-lease "$TIMEOUT" --api-sock "$work/standby.sock" \
	</dev/null >"$work/standby.out" 2>"$work/standby.log" &
pids+=($!)

say "primary: govmm run --net tap:tapP --guest-ip 10.77.0.2/24 --disk disk.img --replicate-to 127.0.0.1:7000 --key-file psk --witness 127.0.0.1:7100 --epoch $EPOCH"
ip netns exec "$ns" "$GOVMM" run --net tap:tapP --guest-ip 10.77.0.2/24 --guest-gw 10.77.0.1 --disk "$work/disk.img" \
	--replicate-to 127.0.0.1:7000 --key-file "$work/psk" --witness 127.0.0.1:7100 \
	--epoch "$EPOCH" --failover-timeout "$TIMEOUT" --witness-lease "$TIMEOUT" --api-sock "$work/primary.sock" \
	</dev/null >"$work/primary.out" 2>"$work/primary.log" &
primary=$!
pids+=($primary)

start=$SECONDS
until grep -q 'govmm-guest: ready' "$work/primary.out" 2>/dev/null &&
	grep -q 'protected by' "$work/primary.log" 2>/dev/null; do
	if ! kill -0 "$primary" 2>/dev/null; then
		echo "demo: the primary exited:"; tail -20 "$work/primary.log"; exit 1
	fi
	if ((SECONDS - start > 300)); then
		echo "demo: the guest was not up and protected within 5 minutes:"; tail -20 "$work/primary.log"; exit 1
	fi
	sleep 0.5
done
"$GOVMM" ctl --api-sock "$work/primary.sock" info

say "client: one keep-alive connection to 10.77.0.2:80, POST /incr and POST /append (fsynced) in a loop"
ip netns exec "$ns" "$CLIENT" -for 30s -every 200ms 10.77.0.2:80 &
client=$!
pids+=($client)
sleep "$KILL_AFTER"

say "SIGKILL the primary"
kill -9 "$primary"
wait "$primary" 2>/dev/null || true
killed=$(date +%s%N)
until grep -q 'took over' "$work/standby.log" 2>/dev/null; do
	if (($(date +%s%N) - killed > 120000000000)); then
		echo "demo: no takeover within 2 minutes:"; tail -20 "$work/standby.log"; exit 1
	fi
	sleep 0.1
done
grep -h 'took over\|witness' "$work/standby.log" | tail -3

set +e
wait "$client"
status=$?
set -e
say "after the failover"
"$GOVMM" ctl --api-sock "$work/standby.sock" info || true
if ((status != 0)); then
	echo "demo: the client's history did NOT check out (status $status)"
	exit 1
fi
say "done: the guest lived on on the standby, and its client never noticed more than a pause"
