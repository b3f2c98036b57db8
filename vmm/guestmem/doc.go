// Package guestmem owns guest RAM as the VMM sees it: anonymous host
// mappings laid out at guest-physical addresses, and the one accessor
// through which VMM code (devices, the loader, the replica) reads and
// writes it.
//
// Invariant (DESIGN.md, invariant 3): every write made through this package
// marks the pages it touched in a VMM dirty bitmap. KVM's dirty log sees only
// vCPU writes; dirtylog ORs the two, so a device that writes guest memory
// any other way makes the standby silently diverge.
//
// Guest addresses are untrusted: every accessor checks the whole range and
// returns ErrOutOfRange rather than panicking or touching host memory outside
// the guest.
//
// Copy-on-write snapshots (cow.go, cowsnap.go, cowprobe.go): a
// Protector write-protects pages of guest memory with userfaultfd and
// serves the write faults, so that a
// Snapshot can copy a set of pages as of one instant while the guest runs
// on; the replicator's copy-on-write checkpoints use it. The accessors
// take part: with a snapshot in progress, WriteAt and Fill copy the
// pages they write first, so the VMM's own writes never fault. The
// userfaultfd ABI is mirrored in uffd.go and pinned to
// <linux/userfaultfd.h> by TestUffdABI.
//
// Summing copies (pagesum.go): CopyPageSummed copies a page out of guest
// memory and, in the same pass, learns what a checksum of it needs (a
// PageSum: whether it is zero, and Fletcher pairs of its 4-byte units),
// so that the replicator's staging copy, or a Snapshot's
// (BeginSummed), spares the stream a second read of every page.
//
// Concurrency: the layout is fixed at New. Accessors may be called from any
// goroutine (vCPU threads, device goroutines, the replicator); the dirty
// bitmaps are updated with atomic operations. Guest memory itself is shared
// with running vCPUs: the content seen by a reader is whatever the guest
// wrote, and ordering with the guest is the device protocol's business
// (virtio barriers), not this package's.
package guestmem
