// Package dirtylog answers one question for the checkpoint path: which
// guest pages changed since the last harvest?
//
// It owns the dirty set. A Tracker has KVM's dirty logging turned on for
// every memory slot of a VM (KVM_MEM_LOG_DIRTY_PAGES) and, at each Harvest, ORs
// KVM's per-slot bitmap (KVM_GET_DIRTY_LOG, or GET then CLEAR_DIRTY_LOG
// with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with the pages that the VMM
// itself wrote through guestmem (virtio used rings, received frames, block
// reads). KVM sees only the writes made by vCPUs; without the second half
// the standby would silently diverge (DESIGN.md, invariant 3).
//
// It does not own the VM or its memory slots: the machine does, and hands
// out trackers with vmm.Machine.TrackDirty, one at a time, through the
// small Slots interface (start and stop logging, read and clear a slot's
// bitmap). No package but vmm holds the KVM VM file descriptor.
//
// It does not own page transport: it never reads or copies page contents,
// never decides what to send, and knows nothing of epochs. A Set is only a
// bitmap per memory region, which the replication code walks with ForEach.
//
// # Invariants
//
//   - New starts from "everything clean": the KVM and VMM bitmaps are
//     harvested once and thrown away, so the first pre-copy round must
//     send every page (NewFullSet), read after New returned.
//   - Every page written after New returned is reported by some later
//     Harvest, provided the caller reads the page's contents after that
//     Harvest returned. A write that races with Harvest shows up in this
//     harvest or in the next one, never in neither (see Harvest for why).
//   - With every vCPU paused and every device quiesced, Harvest is a
//     consistent cut: nothing else writes guest memory, so the set is
//     exactly the pages written since the previous Harvest.
//
// # Goroutines
//
// A Tracker may be used from any goroutine; Harvest and Close serialise on
// a mutex. Harvest may run while vCPUs run (pre-copy rounds) and while
// devices write guest memory. A Set is plain data: it is not safe for
// concurrent mutation, and it is never shared by the Tracker after
// Harvest returns it.
//
// # The dirty ring
//
// KVM_CAP_DIRTY_LOG_RING (a per-vCPU ring of dirtied GFNs, collected during
// the epoch, so that a harvest costs in proportion to the pages dirtied
// rather than to the size of memory) is not used. KVM offers it even on
// kvm_pvm hosts, but it excludes KVM_GET_DIRTY_LOG unless
// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is also offered (it is not there), it
// must be enabled before the first vCPU exists, each ring is mapped from
// its vCPU's fd, and a full ring stops the vCPU with
// KVM_EXIT_DIRTY_RING_FULL: all of which is the vmm and kvmapi packages'
// business. The bitmap harvest costs about 50 µs for 1024 dirty pages of
// a 256 MiB guest and about 27 µs per GiB when clean (BenchmarkHarvest,
// BenchmarkHarvestClean), small beside copying the pages.
// TODO(#dirty-ring): add it when guests are large enough for the scan to
// matter.
package dirtylog
