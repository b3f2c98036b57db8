// Package lab runs a command inside "the lab": a Linux machine (L1) under
// QEMU's software emulation with AMD SVM and nested paging, where Debian's
// stock kernel loads kvm_amd and so offers a /dev/kvm that behaves like
// hardware-assisted KVM. It exists for hosts whose own /dev/kvm cannot
// boot a stock Linux guest at a useful speed (kvm_pvm, as on this
// project's machines, or a cloud VM without nested virtualization): there,
// govmm's real-guest tests, demo and benchmarks run inside the lab.
//
// It owns starting QEMU, the channel that brings the command's output and
// exit status back, telling a failing command apart from a failing L1
// (which it may retry once, saying so), and the timeout. It does not own
// the L1 image: guestimg.BuildLab builds that from the same Debian
// packages as the default guest, with guestimg/labinit.sh as its /init.
//
// What L1 sees: the host's / read-only over 9p under a throwaway tmpfs
// overlay (so the host's Go toolchain, the checkout and the guest image
// cache are there as they are, and nothing the command writes reaches the
// host), fresh /proc, /sys, /dev, /run and /tmp, and writable 9p shares of
// the directories the caller names (Config.Shares). Its network is its
// own: loopback only, plus whatever the command creates (TAPs, bridges,
// namespaces).
//
// Everything in the lab is emulated: use its timings for ratios measured
// side by side inside it, never as absolute numbers.
//
// Goroutines: Run starts one that copies the output socket to
// Config.Stdout and one that waits for QEMU; both end before Run returns.
package lab
