#!/usr/bin/env bash
# Installs the Debian packages govmm's build and tests use, when missing.
# Usage: scripts/deps.sh [test|bench]
set -euo pipefail
# qemu-system-x86 runs the lab (nested KVM for real-guest tests where this
# host's KVM cannot boot Linux) and the QEMU side of the benchmarks.
want=(apt-utils dpkg xz-utils iproute2 qemu-system-x86)
missing=()
for p in "${want[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
