#!/usr/bin/env bash
# Runs the tests that need KVM but no Linux guest (tiny hand-made guests:
# every test not named TestGuest*) inside the lab, for a host that has no
# /dev/kvm at all: there `go test ./...` skips them (kvmtest.Require), and
# without this script nothing would run the VMM's core, the dirty log,
# replication and the command on a real KVM. Where this host has
# /dev/kvm, make test's `go test` runs them here and this script says so
# and does nothing. Inside the lab kvmtest.Require fails rather than
# skips, so a test cannot pass by not running.
#
# Each package's test binary, compiled here, runs in an L1 of its own
# (two at once, sharing this host's CPUs, as scripts/guest-tests.sh does);
# their output goes to bin/kvm-tests/PKG.log and is printed when it ends.
#
# The packages in -race (make test passes KVM_RACE_PKGS: vmm and dirtylog;
# replicate's KVM tests are too slow with -race in the lab, see
# docs/ARCHITECTURE.md) run a second time, built with the race detector.
#
# With -skips FILE (make test: its host stage's go test wrote it, one line
# per test kvmtest.Require skipped, see kvmtest.SkipsEnv) only those tests
# run in the lab: the package's other tests passed on the host already,
# and a minutes-long binary on L1's emulated CPUs is no place to run them
# again. Each listed test must then show a result in the lab's output. A
# package with KVM tests but no line in FILE runs whole, and says so.
#
# Usage: scripts/kvm-tests.sh [-run REGEXP | -skips FILE] [-race 'PKG...']
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run=.
race=
skips=
while (($#)); do
	case $1 in
	-run) run=$2; shift 2 ;;
	-race) race=$2; shift 2 ;;
	-skips) skips=$2; shift 2 ;;
	*) echo "kvm-tests: unknown argument $1" >&2; exit 2 ;;
	esac
done
if [[ -n $skips && $run != . ]]; then
	echo "kvm-tests: -run and -skips both choose the tests: give one" >&2
	exit 2
fi
if [[ -e /dev/kvm ]]; then
	echo "kvm-tests: this host has /dev/kvm: go test ran the KVM tests here"
	exit 0
fi
# name is the file name for $1 (./replicate:race: replicate.race).
name() {
	local p=${1#./}
	p=${p/:race/.race}
	echo "${p//\//_}"
}
out=bin/kvm-tests
rm -rf "$out" && mkdir -p "$out"
go build -o bin/govmm ./cmd/govmm
# cmd/govmm's tests run this binary instead of building their own inside
# L1 (3 min of its emulated CPUs).
export GOVMM_BIN=$root/bin/govmm
kvm=$(grep -rl --include='*_test.go' 'kvmtest\.Require\b' . | xargs -n1 dirname | sort -u)
# pkgs lists what runs, the slowest first (two L1s at once finish
# soonest that way): bench, cmd/govmm and replicate, then the race runs,
# then the other packages with KVM tests. A race run is PKG:race. In CI
# (2026-12-05/06) bench took 7.7-12.7 min in its L1, cmd/govmm ~4,
# replicate ~3.5, each of the others under one. Bench last took 701-832 s
# in all, bench first 727 and 766 s: it runs slower sharing the host
# throughout, so the order gains little.
pkgs=
for p in ./bench ./cmd/govmm ./replicate; do
	grep -qx -- "$p" <<<"$kvm" && pkgs+=" $p"
done
for r in $race; do
	r=./${r#./}
	grep -qx -- "$r" <<<"$kvm" || { echo "kvm-tests: -race $r: the package has no KVM tests" >&2; exit 2; }
	pkgs+=" $r:race"
done
for p in $kvm; do
	[[ " $pkgs " == *" $p "* ]] || pkgs+=" $p"
done
for p in $pkgs; do
	pkg=${p%:race} flags=()
	[[ $p == *:race ]] && flags=(-race)
	go test -c "${flags[@]}" -o "$out/$(name "$p").test" "$pkg"
done
echo "kvm-tests: no /dev/kvm here: the KVM tests of $(echo $kvm | wc -w) packages run in the lab, $(echo $race | wc -w) of them again with -race"
# With -skips, $out/PKG.tests lists package PKG's tests to run (those the
# host skipped), and $out/PKG.run is the -test.run pattern for them.
for p in $pkgs; do
	n=$(name "$p")
	echo "$run" >"$out/$n.run"
	[[ -n $skips ]] || continue
	pkg=${p%:race}
	pkg=${pkg#./}
	{ awk -F'\t' -v d="$(pwd -P)/$pkg" '$1 == d && $2 !~ /^TestGuest/ { print $2 }' "$skips" 2>/dev/null || true; } | sort -u >"$out/$n.tests"
	if [[ ! -s $out/$n.tests ]]; then
		echo "kvm-tests: ${p#./}: no test of it skipped on the host for want of /dev/kvm ($skips): running all of its tests"
		rm "$out/$n.tests"
		continue
	fi
	echo "^($(paste -sd'|' "$out/$n.tests"))\$" >"$out/$n.run"
	echo "kvm-tests: ${p#./}: $(wc -l <"$out/$n.tests") of its tests, those that skipped on the host for want of /dev/kvm"
done

# run_pkg runs package $1's KVM tests in an L1 and records its status.
run_pkg() {
	local pkg=${1#./} n st
	n=$(name "$1")
	pkg=${pkg%:race}
	set +e
	bin/govmm lab --cpus 2 --share-cpus --retries 2 --timeout 30m -- \
		bash -c "cd '$root/$pkg' && exec '$root/$out/$n.test' -test.run '$(cat "$out/$n.run")' -test.skip '^TestGuest' -test.v -test.timeout 25m" \
		>"$out/$n.log" 2>&1
	st=$?
	set -e
	echo "$st" >"$out/$n.result"
	{
		flock 9
		sed "s|^|[${1#./}] |" "$out/$n.log"
	} 9>>"$out/.print.lock"
}

start=$SECONDS
for p in $pkgs; do
	while (($(jobs -rp | wc -l) >= 2)); do
		wait -n || true
	done
	run_pkg "$p" &
done
wait
failed=0
for p in $pkgs; do
	st=$(cat "$out/$(name "$p").result" 2>/dev/null || echo missing)
	# Every test chosen from -skips ran: a result line of its own.
	if [[ $st == 0 && -e $out/$(name "$p").tests ]]; then
		while read -r t; do
			if ! grep -qE "^--- (PASS|FAIL|SKIP): $t \(" "$out/$(name "$p").log"; then
				echo "kvm-tests: ${p#./}: $t skipped on the host but has no result in the lab"
				st=missing-tests
			fi
		done <"$out/$(name "$p").tests"
	fi
	echo "kvm-tests: ${p#./}: $([[ $st == 0 ]] && echo passed || echo "FAILED (status $st)")"
	if [[ $st != 0 ]]; then
		failed=$((failed + 1))
		# CI shows the end of the output: the failure's lines again here.
		{ grep -n -B3 -A8 -E 'Error Trace:|^panic:|test timed out|^--- FAIL|WARNING: DATA RACE|^lab: ' "$out/$(name "$p").log" ||
			tail -n 40 "$out/$(name "$p").log"; } 2>/dev/null | head -n 80 | sed 's/^/    /' || true
	fi
	# A test may skip in the lab only for a reason that is not the lab's
	# lack (those fail: kvmtest.Require, loop devices); say which did.
	awk -v p="${p#./}" '/^    [^ ]/ { why = $0; sub(/^ +/, "", why) }
		/^--- SKIP: / { print "kvm-tests: " p ": skipped " $3 ": " why }' "$out/$(name "$p").log" 2>/dev/null || true
done
echo "kvm-tests: summary: $(echo $pkgs | wc -w) runs, $failed failed, $((SECONDS - start)) s"
# Last, a line per failure (scripts/failures.awk): CI shows only the end.
for p in $pkgs; do
	[[ $(cat "$out/$(name "$p").result" 2>/dev/null) == 0 ]] && continue
	awk -v prefix="kvm-tests: ${p#./}: " -f scripts/failures.awk "$out/$(name "$p").log" 2>/dev/null | tail -n 8 || true
done
((failed == 0))
