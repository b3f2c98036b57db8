#!/bin/sh
# /init of the lab's L1 machine (built by guestimg.BuildLab, run by package
# lab). L1 is Debian's stock kernel under QEMU's software emulation of AMD
# SVM; it loads kvm_amd, so govmm runs in it on a hardware-virtualization
# style /dev/kvm. It mounts the host's / read-only over 9p under a tmpfs
# overlay, chroots into it and runs the harness's command there. The
# harness and this script talk through files in the writable 9p share
# "labctl", mounted at /lab:
#
#   cmd.sh    the command, as a script for the host's /bin/sh (harness)
#   shares    "TAG PATH" lines: more writable 9p shares, at PATH (harness)
#   trace-kvm if present, turn KVM's trace events on (harness)
#   started   the command has begun (init)
#   heartbeat touched every 5 s while it runs: a sign of life (init)
#   status    its exit status, written last (init)
#   error     why L1 could not run it at all (init)
#
# Everything the command prints goes to the virtio console port
# "govmm.out"; the kernel's own console (ttyS0) is the harness's log.
PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
	echo "lab: $*"
	echo "$*" >/lab/error
	sync
	poweroff -f
}

for m in $(cat /etc/lab/modules); do
	insmod "$m" 2>/dev/null || echo "lab: insmod $m failed" >/dev/console
done

# The output port, by its name (no udev here to make the symlink).
OUT=/dev/console
for p in /sys/class/virtio-ports/*; do
	[ "$(cat "$p/name" 2>/dev/null)" = govmm.out ] && OUT=/dev/${p##*/}
done
exec >"$OUT" 2>&1

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 labctl /lab ||
	{ echo "lab: cannot mount the control share"; poweroff -f; }
[ -c /dev/kvm ] || fail "L1 has no /dev/kvm: kvm_amd did not load (is QEMU's CPU model without svm?)"

mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /host ||
	fail "cannot mount the host's / over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot ||
	fail "cannot mount the overlay on the host's /"

# Fresh kernel file systems inside the new root: the initramfs's own
# mounts cannot be moved there (EINVAL), and the host's are not ours.
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm $R/dev/net
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
ln -sf pts/ptmx $R/dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mkdir -p $R/sys/fs/cgroup
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
[ -c $R/dev/net/tun ] || mknod $R/dev/net/tun c 10 200
mkdir -p $R/run/govmm-lab
mount --bind /lab $R/run/govmm-lab
if [ -f /lab/shares ]; then
	while read -r tag dir; do
		mkdir -p "$R$dir" 2>/dev/null
		mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "$tag" "$R$dir" ||
			fail "cannot mount the writable share $dir"
	done </lab/shares
fi
hostname lab
ip link set lo up

# KVM's trace events (exits, injected exceptions, exits to userspace), if
# the harness asks (govmm lab --trace-kvm): on for the whole run, turned on
# here before any VM exists and never off, since turning an event on or off
# rewrites kernel code (text_poke_bp), and QEMU's emulation of that while a
# guest runs has wedged L1 (docs/ARCHITECTURE.md, "The lab").
T=/sys/kernel/tracing
if [ -f /lab/trace-kvm ] && mount -t tracefs nodev $T && [ -d $T/events/kvm ]; then
	echo 16384 >$T/buffer_size_kb
	for e in kvm_exit kvm_inj_exception kvm_userspace_exit; do echo 1 >$T/events/kvm/$e/enable; done
	echo 1 >$T/tracing_on
fi

# One line that says where the command runs, for the test logs.
echo "lab: L1 $(uname -r), $(grep -c ^processor /proc/cpuinfo) vCPUs, $(($(sed -n 's/MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) / 1024)) MiB, /dev/kvm from kvm_amd (nested SVM on QEMU TCG), up in $(cut -d' ' -f1 /proc/uptime) s"

: >/lab/started
sync
# A sign of life for the harness, which kills an L1 whose heartbeat stops
# (QEMU's emulation has wedged L1 whole: every process stopped, no panic).
(while :; do : >/lab/heartbeat; sleep 5; done) &
chroot $R /bin/sh /run/govmm-lab/cmd.sh </dev/null
status=$?
echo $status >/lab/status.tmp
mv /lab/status.tmp /lab/status
sync
poweroff -f
