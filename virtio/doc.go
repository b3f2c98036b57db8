// Package virtio owns govmm's virtio devices as the guest sees them: the
// virtio-pci modern transport (virtio 1.x §4.1), split virtqueues (§2.7),
// virtio-blk over a raw image file (§5.2; its discards and write-zeroes
// punch holes through ImageZeroer, which the standby's disk sink shares,
// or with NoDiscard zero in place so that the image stays allocated)
// and virtio-net (§5.1) over a NetBackend. Network backends themselves (TAP, user-mode networking) live
// in virtio/netback; the PCI host bridge, BAR placement and the MMIO bus
// live in vmm, which reaches these devices only through pci.Device,
// pci.BARMapper and devstate.Stateful.
//
// It does not own guest memory (vmm/guestmem), PCI configuration space or
// MSI-X tables (vmm/pci), nor replication policy: virtio-blk offers
// OnWrite/OnZero/OnFlush hooks and virtio-net a NetBackend that replicate
// wraps.
//
// Invariants:
//
//   - Every value the guest puts in a ring is hostile. The chain walker
//     (Queue.Pop) checks indices, chain length, indirect tables, flag
//     order and that every buffer lies inside guest memory, and returns a
//     *ChainError naming the rule. A device that meets a malformed ring
//     stops, sets DEVICE_NEEDS_RESET and raises a configuration interrupt;
//     it never panics and never touches memory outside the guest.
//   - Guest memory is read and written only through guestmem.Memory;
//     every write (used ring, block reads, received frames) goes through
//     WriteAt or Fill, which mark the pages dirty for the standby once the
//     bytes are in place (DESIGN.md invariant 3).
//   - Quiesce returns only at a request boundary; until Resume the device
//     writes no guest memory and raises no interrupt.
//
// Goroutines: vCPU threads call ReadBAR/WriteBAR/BARMapped; each device
// has one worker goroutine that waits on per-queue eventfds (signalled by
// KVM ioeventfds or by WriteBAR) and is the only one to walk rings and
// touch guest memory; network backends call the receiver from their own
// goroutines, which only queue a copy of the frame. See the comment at the
// top of pci.go for the locking.
//
// Files: pci.go is the transport as a PCI function (capabilities, BAR 0
// dispatch, ioeventfds); common.go its common configuration registers,
// device status and reset; worker.go the worker, interrupts and breaking
// on a malformed ring; state.go its part of the machine state, one
// explicit struct (transportState, with the device type's own part
// inside) walked once by a devstate.Codec for both save and restore;
// queue.go the split virtqueue; net.go and blk.go the device types,
// blkzero.go virtio-blk's discard and write-zeroes.
package virtio
