#!/usr/bin/env bash
# govmm bench failover-guest in short runs, each in an L1 of its own, as
# many side by side as this host's CPUs hold, merged into one report:
# where the lab runs it, an L1 may die before 20 replicated trials end,
# and then only that run is repeated (govmm lab --retries), not the rest.
# Where this host's KVM boots Linux, the runs go here, one at a time.
#
# Usage: scripts/bench-failover-guest.sh [RUNS [TRIALS [MODES [WITNESS]]]]
#   RUNS    short runs (default 5), each of TRIALS trials (default 1) of
#           every mode, without and with a witness
#   MODES   sigkill, sigstop or sigkill,sigstop (the default): the
#           default makes 4 trials per run and trial, 20 in all
#   WITNESS without, with or both (the default)
# Results: bench/results/<timestamp>/ (report.md, CSV, plot), each run's
# own results in run-N/ under it.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
trials=${2:-1}
modes=${3:-sigkill,sigstop}
witness=${4:-both}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
make -s build image
dirs=() pids=()
for ((i = 1; i <= runs; i++)); do
	d=$out/run-$i
	mkdir -p "$d"
	dirs+=(--merge "$d")
	if bin/govmm lab --needed; then
		bin/govmm lab --retries 3 --timeout 45m --share "$d" -- bin/govmm bench --runs "$trials" --modes "$modes" --witness "$witness" --out "$d" failover-guest >"$d/output.log" 2>&1 &
		pids+=($!)
	else
		bin/govmm bench --runs "$trials" --modes "$modes" --witness "$witness" --out "$d" failover-guest >"$d/output.log" 2>&1 || echo "bench-failover-guest: run $i failed (see $d/output.log)"
	fi
done
for i in "${!pids[@]}"; do
	wait "${pids[$i]}" || echo "bench-failover-guest: run $((i + 1)) failed (see $out/run-$((i + 1))/output.log)"
done
bin/govmm bench "${dirs[@]}" --out "$out" failover-guest
