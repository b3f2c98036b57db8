// Package guestimg builds the default govmm guest: Debian's stock kernel
// (the bzImage, and the vmlinux extracted from it once and packed, which
// govmm boots through PVH: ExtractVmlinux, TrimVmlinux) and an initramfs
// with busybox, the kernel modules for virtio-pci networking and block
// storage and ext4 (each listed with the devices it is for: /init loads
// only those of the devices present), Debian's mke2fs with its shared
// libraries, and one small static multi-call Go binary: /init, which is
// also the demo HTTP service and the memory dirtier of the benchmarks
// (/bin/govmm-demo and /bin/govmm-dirtier link to it).
//
// It owns:
//
//   - fetching the packages (linux-image-amd64 resolved to the versioned
//     kernel package, busybox-static, e2fsprogs and its library packages)
//     with apt-get (the download's progress, bytes against the sizes apt
//     announces, through Options.Progress), and unpacking them with
//     dpkg-deb;
//   - the module dependency closure (from modules.dep, generated from the
//     modules' .modinfo when the package lacks it) and the ELF DT_NEEDED
//     closure of mke2fs;
//   - a newc cpio writer, the initramfs layout, and CommandArchive, the
//     small archive the VMM appends to switch /init to command mode;
//   - the content-addressed cache (see Build) and the guest programs'
//     sources under guest/, which are embedded in the binary (guestSources)
//     and compiled in a temporary module, so an installed govmm needs the
//     go command but not the checkout.
//
// It does not own booting (package vmm) or anything at run time of the
// host; it stands outside the runtime and nothing in the VMM imports it
// except to find the image.
//
// The contract with the guest's /init and the VMM is in
// internal/guestproto: ReadyLine, BootTraceLine, the command file, the module list and the
// exit port. The guest expects the kernel command line to name the serial
// console (console=ttyS0), reboot=k (so "reboot" resets through the i8042),
// and optionally govmm.ip=ADDR/PREFIX, govmm.gw=ADDR and govmm.debug=1.
//
// Invariants: an image directory is complete or absent (temporary
// directory, fsync, rename); the same inputs give the same key and the same
// bytes; a cached Build touches neither apt nor the network. Build may be
// called from several goroutines and processes at once: a lock file in the
// cache serializes the builders; a cache hit takes no lock.
package guestimg
