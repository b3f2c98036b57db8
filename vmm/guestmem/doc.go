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
// Concurrency: the layout is fixed at New. Accessors may be called from any
// goroutine (vCPU threads, device goroutines, the replicator); the dirty
// bitmaps are updated with atomic operations. Guest memory itself is shared
// with running vCPUs: the content seen by a reader is whatever the guest
// wrote, and ordering with the guest is the device protocol's business
// (virtio barriers), not this package's.
package guestmem
