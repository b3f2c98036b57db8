#!/usr/bin/env bash
# Runs the real-guest tests (every test named TestGuest*: they boot the
# default guest) where a stock Linux guest can boot: directly when this
# host's KVM can, otherwise inside the lab (govmm lab: nested KVM under
# QEMU). A real-guest test that skips there counts as a failure.
#
# Each test runs in an L1 of its own (an L1 boots in about 3 s) of
# GUEST_TEST_L1_CPUS vCPUs (default 2), the test pinned to L1's CPU 0,
# GUEST_TEST_JOBS L1s at once (default 2 in the lab, longest tests
# first: each L1 keeps only its CPU 0 busy, so two of them share this
# host's two CPUs and both work). When L1 itself dies (a panic of its
# emulated kernel: a stack overflow inside kvm_amd's VMRUN path, seen with
# 2 vCPUs unpinned or with guests on both of L1's CPUs at once; an RCU
# stall), govmm lab runs that one test again, up to GUEST_TEST_L1_RETRIES
# times (default 3), and one test's wreckage never reaches the next. A test that fails on
# its own is never retried, but for the lab's known guest crash (below).
# Each run's output is printed whole when it ends, each line tagged with
# its test. GOVMM_LAB_TRACE_KVM=1 has each failed test print L1's last
# KVM events (off by default: turning them on has wedged L1).
#
# Usage: scripts/guest-tests.sh [-run REGEXP] [-count N] [-timeout DUR]
#   -run      which tests (default ^TestGuest; only TestGuest* ever run)
#   -count    run each N times (soak), each run in an L1 of its own; a
#             failed run does not stop the next; the summary counts them
#   -timeout  for the whole run, every L1 boot included (default 47m: CI
#             must end within 60, and its other parts take 11-14 min; one
#             L1 at a time, the lab part took 24 to 38 min in clean-clone
#             runs on 2026-12-01 and 02; two at a time, 13 min on 02);
#             Go duration units s, m or h
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run='^TestGuest' count=1 timeout=${GUEST_TEST_TIMEOUT:-47m} inside=
while (($#)); do
	case $1 in
	-run) run=$2; shift 2 ;;
	-count) count=$2; shift 2 ;;
	-timeout) timeout=$2; shift 2 ;;
	--inside) inside=$2; shift 2 ;;
	*) echo "guest-tests: unknown argument $1" >&2; exit 2 ;;
	esac
done
bins=bin/guest-tests
export GOVMM_BIN=$root/bin/govmm

# Inside (an L1, or this host when its KVM boots Linux): one package's
# test binary, the tests -run selects, with the time left.
if [[ -n $inside ]]; then
	[[ ${GOVMM_LAB:-} == 1 ]] && echo "guest-tests: in the lab ($inside, $run)"
	cd "$inside"
	exec "$root/$bins/$(echo "$inside" | tr / _).test" -test.run "$run" -test.v -test.timeout "$timeout"
fi

seconds() { # a Go-style duration (90s, 35m, 3h) in seconds
	case $1 in
	*h) echo $((${1%h} * 3600)) ;; *m) echo $((${1%m} * 60)) ;; *s) echo "${1%s}" ;;
	*) echo "guest-tests: -timeout $1: use s, m or h" >&2; exit 2 ;;
	esac
}
deadline=$((SECONDS + $(seconds "$timeout")))

# lab_crash_seen says whether a test's output shows the lab's known guest
# crash, only where the lab runs it (on hardware KVM it is a failure):
# recursive page faults then a triple fault, or (seen once, 2026-12-04)
# a double fault at the very first instruction of a system call, before
# its swapgs, an event taken there with IF clear and the user's stack.
lab_crash_seen() {
	grep -q '^guest-tests: in the lab' "$1" || return 1
	grep -q -e 'guest triple fault' -e 'asm_exc_page_fault' "$1" && return 0
	grep -q 'PANIC: double fault' "$1" && grep -q 'RIP: 0010:entry_SYSCALL_64+0x0/' "$1"
}

# Compile on this host (compiling in the lab would be emulated too).
pkgs=$(grep -rl --include='*_test.go' '^func TestGuest' . | xargs -n1 dirname | sort -u)
rm -rf "$bins" && mkdir -p "$bins"
go build -o bin/govmm ./cmd/govmm
for p in $pkgs; do
	go test -c -o "$bins/$(echo "${p#./}" | tr / _).test" "$p"
done
# The soak knobs (make soak), GOVMM_TEST_CHECKPOINT_COPY,
# GOVMM_TEST_CHECKPOINT_COW_PAGES and GOVMM_TEST_EPOCH (the replicated
# tests' --checkpoint-copy, --checkpoint-cow-pages and --epoch; in the lab
# the epoch is guestrig.LabEpoch unless set) reach the tests inside the lab.
envs=()
for v in $(compgen -e | grep -E '^(GOVMM_SOAK_|GOVMM_TEST_CHECKPOINT_COPY$|GOVMM_TEST_CHECKPOINT_COW_PAGES$|GOVMM_TEST_EPOCH$)' || true); do envs+=(--env "$v=${!v}"); done

# Each run's output is kept in $logs (make soak reads its numbers there).
logs=$bins/logs
mkdir -p "$logs"

# In the lab, each run in an L1 of GUEST_TEST_L1_CPUS vCPUs (default 2),
# GUEST_TEST_JOBS of them at once (default 2); govmm lab runs the test on
# L1's CPU 0 only (--pin's default), which keeps the lab's guest crash
# away, and L1's other vCPUs serve its own kernel (9p, interrupts) and
# idle. So two L1s of 2 vCPUs share this host's 2 CPUs (--share-cpus,
# when their vCPUs outnumber the host's CPUs): each has one busy vCPU.
# (What did not work: two 1-vCPU L1s side by side, four times in some 20
# tests one stopped making progress; two tests in one L1, one on each of
# its CPUs, L1 died in 4 of 4 boots: docs/ARCHITECTURE.md, "The lab".)
# Where this host's KVM boots Linux, one at a time.
l1cpus=${GUEST_TEST_L1_CPUS:-2}
share_cpus=
if bin/govmm lab --needed; then
	jobs=${GUEST_TEST_JOBS:-2}
	((jobs * l1cpus <= $(nproc))) || share_cpus=--share-cpus
else
	jobs=1
fi
((jobs >= 1)) || jobs=1

# run_once runs test $2 of package $1 once, in an L1 of its own where
# needed, its output in log file $3, and writes "status crashed" (status
# 0: passed; crashed 1: after the lab's guest crash) to $3.result.
run_once() {
	local pkg=$1 t=$2 log=$3 try left passed st crashed=0
	for try in 1 2 3; do
		left=$((deadline - SECONDS))
		set +e
		bin/govmm lab --if-needed --cpus "$l1cpus" $share_cpus --retries "${GUEST_TEST_L1_RETRIES:-3}" --timeout "${left}s" "${envs[@]}" -- \
			"$root/scripts/guest-tests.sh" --inside "$pkg" -run "^$t\$" -timeout "${left}s" >"$log" 2>&1
		st=$?
		set -e
		# The lab's known guest crash (see docs/ARCHITECTURE.md, "The
		# lab"): a guest kernel taking an interrupt with the user's GS
		# base (recursive page faults, then a triple fault), the same
		# fault that kills L1's own kernel. Up to two more runs, said loudly.
		if ((st != 0 && try < 3 && left > 300)) && lab_crash_seen "$log"; then
			echo "guest-tests: $pkg.$t: a guest died of the lab's known crash (guest triple fault / recursive page fault / double fault at system call entry); running the test again (try $((try + 1)) of 3)" >>"$log"
			mv "$log" "${log%.log}.crashed-$try.log"
			crashed=1
			continue
		fi
		break
	done
	passed=$(grep -c -- "^--- PASS: $t " "$log" || true)
	if grep -q -- "--- SKIP: $t " "$log"; then
		echo "guest-tests: $pkg.$t skipped where Linux boots: that is a failure here" >>"$log"
		st=1
	fi
	if ((st == 0 && passed == 0)); then
		echo "guest-tests: $pkg.$t did not run" >>"$log"
		st=1
	fi
	echo "$st $crashed" >"$log.result"
	# The whole output at once, under a lock, so that runs side by side
	# do not mix.
	{
		flock 9
		{
			[[ $crashed == 0 ]] || cat "${log%.log}".crashed-*.log
			cat "$log"
		} | sed "s|^|[$t${4:+ $4}] |"
	} 9>>"$logs/.print.lock"
}

# Every test ("package test"), then every run, in order: package, test,
# repetition.
tests=() runs=()
for p in $pkgs; do
	pkg=${p#./}
	# Listing needs no KVM: it runs here.
	for t in $(cd "$pkg" && "$root/$bins/$(echo "$pkg" | tr / _).test" -test.list "$run" | grep '^TestGuest' || true); do
		tests+=("$pkg $t")
		for ((rep = 1; rep <= count; rep++)); do
			runs+=("$pkg $t $rep")
		done
	done
done
if ((${#runs[@]} == 0)); then
	echo "guest-tests: no real-guest test matches $run"
	exit 1
fi
echo "guest-tests: ${#runs[@]} runs, $jobs at a time$( ((jobs > 1)) && echo ", each in an L1 of $l1cpus vCPU(s)${share_cpus:+ (the L1s share the host CPUs)}" || true)"

# The runs in the order they start: the longest first (the lab's seconds
# per test in clean-clone runs, 2026-12-02), so that L1s side by side end
# together; the others after them, in order.
ordered=()
declare -A placed=()
for slow in CommandOutput TakeoverEquals MigrateUnderLoad Fencing FailoverKeeps DemoUserNet ReplicatedBoot ''; do
	for r in "${runs[@]}"; do
		read -r pkg t rep <<<"$r"
		[[ $t == TestGuest"$slow"* && -z ${placed[$r]:-} ]] || continue
		placed[$r]=1
		ordered+=("$r")
	done
done

start=$SECONDS
for r in "${ordered[@]}"; do
	read -r pkg t rep <<<"$r"
	while (($(jobs -rp | wc -l) >= jobs)); do
		wait -n || true
	done
	if ((deadline - SECONDS < 60)); then
		break # the rest: not run
	fi
	log="$logs/$(echo "$pkg" | tr / _).$t.$rep.log"
	rm -f "$log.result"
	run_once "$pkg" "$t" "$log" "$( ((count > 1)) && echo "$rep/$count" || true)" &
	echo "$SECONDS" >"$log.start"
done
wait

# The summary: per test, how many of its runs passed, in how long; and
# the failed runs ("log what"), whose errors follow it.
fail=0 summary=() failed=()
for pt in "${tests[@]}"; do
	read -r pkg t <<<"$pt"
	passes=0 done=0 crashes=0 secs=0
	for ((rep = 1; rep <= count; rep++)); do
		log="$logs/$(echo "$pkg" | tr / _).$t.$rep.log"
		[[ -e $log.result ]] || continue
		read -r st crashed <"$log.result"
		done=$((done + 1))
		if ((st == 0)); then
			passes=$((passes + 1))
		else
			failed+=("$log $pkg.$t$( ((count > 1)) && echo " (run $rep)" || true)")
		fi
		crashes=$((crashes + crashed))
		secs=$((secs + $(stat -c %Y "$log") - $(stat -c %Y "$log.start")))
	done
	if ((done < count)); then
		what="$( ((done == 0)) && echo "not run" || echo "$passes of $done passed") ($((count - done)) not run: out of time, -timeout $timeout)"
		fail=1
	elif ((passes == count)); then
		what=$( ((count == 1)) && echo pass || echo "pass ($count of $count)")
	else
		what="FAIL$( ((count > 1)) && echo ": $passes of $count passed" || true)"
		fail=1
	fi
	# (each $(...) ends in || true: under set -e an assignment takes the
	# status of its last command substitution, and a false test there
	# would end the script without its summary)
	note=
	((crashes == 0)) || note=" (after the lab's guest crash$( ((count > 1)) && echo " in $crashes runs" || true))"
	summary+=("$(printf '%-48s %s  %4ds%s' "$pkg.$t" "$what" "$secs" "$note")")
done
echo "guest-tests: summary after $((SECONDS - start))s ($jobs at a time; each test in its own L1 where this host's KVM cannot boot Linux):"
printf '  %s\n' "${summary[@]}"
# Why each failed run failed, after the summary: CI shows only the end of
# what it printed, and the full output is far above.
for f in "${failed[@]}"; do
	read -r log what <<<"$f"
	echo "guest-tests: why $what failed (whole output: above, or $log):"
	# (|| true: head may end the pipe early, and pipefail would end the
	# script with it)
	{ grep -n -B3 -A14 -E 'Error Trace:|^panic:|test timed out|^--- FAIL|^guest-tests: .*(fail|skipped|did not run|crash)|^lab: (command|.*(fail|error|crash|timed out))' "$log" || tail -n 40 "$log"; } | head -n 120 | sed 's/^/    /' || true
done
# Last, a line per failure (scripts/failures.awk): CI shows only the end.
for f in "${failed[@]}"; do
	read -r log what <<<"$f"
	awk -v prefix="guest-tests: $what: " -f scripts/failures.awk "$log" 2>/dev/null | tail -n 6 || true
done
exit $fail
