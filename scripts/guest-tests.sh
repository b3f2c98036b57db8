#!/usr/bin/env bash
# Runs the real-guest tests (every test named TestGuest*: they boot the
# default guest) where a stock Linux guest can boot: directly when this
# host's KVM can, otherwise inside the lab (govmm lab: nested KVM under
# QEMU). A real-guest test that skips there counts as a failure.
#
# Usage: scripts/guest-tests.sh [-run REGEXP] [-count N] [-timeout DUR]
#   -run      which tests (default ^TestGuest; anchored to TestGuest anyway)
#   -count    run each N times (soak)
#   -timeout  for the whole run, boot of the lab included (default 35m: CI must end within 60)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run='^TestGuest' count=1 timeout=${GUEST_TEST_TIMEOUT:-35m} inside=
while (($#)); do
	case $1 in
	-run) run=$2; shift 2 ;;
	-count) count=$2; shift 2 ;;
	-timeout) timeout=$2; shift 2 ;;
	--inside) inside=1; shift ;;
	*) echo "guest-tests: unknown argument $1" >&2; exit 2 ;;
	esac
done
bins=bin/guest-tests

if [[ -z $inside ]]; then
	# Compile on this host (compiling in the lab would be emulated too).
	pkgs=$(grep -rl --include='*_test.go' '^func TestGuest' . | xargs -n1 dirname | sort -u)
	rm -rf "$bins" && mkdir -p "$bins"
	go build -o bin/govmm ./cmd/govmm
	for p in $pkgs; do
		go test -c -o "$bins/$(echo "${p#./}" | tr / _).test" "$p"
		echo "${p#./}" >>"$bins/packages"
	done
	# The soak knobs (make soak) reach the tests inside the lab.
	envs=()
	for v in $(compgen -e | grep '^GOVMM_SOAK_' || true); do envs+=(--env "$v=${!v}"); done
	exec bin/govmm lab --if-needed --timeout "$timeout" "${envs[@]}" -- \
		"$root/scripts/guest-tests.sh" --inside -run "$run" -count "$count" -timeout "$timeout"
fi

# Inside: here a Linux guest boots (hardware KVM, or the lab's L1).
export GOVMM_BIN=$root/bin/govmm
where="this host's KVM"
[[ ${GOVMM_LAB:-} == 1 ]] && where="the lab"
echo "guest-tests: real-guest tests in $where"
fail=0 summary=() ran=
while read -r pkg; do
	bin=$root/$bins/$(echo "$pkg" | tr / _).test
	if ! (cd "$pkg" && "$bin" -test.list "$run") | grep -q '^TestGuest'; then
		summary+=("$(printf '%-24s no test matches %s' "$pkg" "$run")")
		continue
	fi
	ran=1
	log=$(mktemp)
	start=$SECONDS
	set +e
	(cd "$pkg" && "$bin" -test.run "$run" -test.count "$count" -test.v -test.timeout "$timeout") 2>&1 | tee "$log"
	st=${PIPESTATUS[0]}
	set -e
	passed=$(grep -c -- '^--- PASS: TestGuest' "$log" || true)
	skipped=$(grep -c -- '--- SKIP: TestGuest' "$log" || true)
	failed=$(grep -c -- '--- FAIL: TestGuest' "$log" || true)
	if ((skipped > 0)); then
		echo "guest-tests: $pkg: $skipped real-guest test(s) skipped in $where: that is a failure here"
		st=1
	fi
	if ((st == 0 && passed == 0)); then
		echo "guest-tests: $pkg: no real-guest test ran"
		st=1
	fi
	summary+=("$(printf '%-24s %3d passed %3d failed %3d skipped  %4ds  status %d' "$pkg" "$passed" "$failed" "$skipped" $((SECONDS - start)) "$st")")
	((st == 0)) || fail=1
	rm -f "$log"
done <"$root/$bins/packages"
if [[ -z $ran ]]; then
	echo "guest-tests: no real-guest test matches $run"
	fail=1
fi
echo "guest-tests: summary ($where):"
printf '  %s\n' "${summary[@]}"
exit $fail
