// Package dirtylog answers one question for the checkpoint path: which
// guest pages changed since the last harvest?
//
// It owns the dirty set. A Tracker has KVM's dirty logging turned on for
// every memory slot of a VM (KVM_MEM_LOG_DIRTY_PAGES) and, at each Harvest,
// ORs what KVM logged with the pages that the VMM itself wrote through
// guestmem (virtio used rings, received frames, block reads). KVM sees
// only the writes made by vCPUs; without the second half the standby
// would silently diverge (DESIGN.md, invariant 3).
//
// KVM logs in one of two ways, fixed when the VM is built
// (vmm.Config.DirtyTracking), and the Tracker returns the same Set either
// way (Tracker.Source says which):
//
//   - bitmap: one bitmap per slot, read by KVM_GET_DIRTY_LOG (then
//     re-armed by KVM_CLEAR_DIRTY_LOG with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
//     A harvest scans every slot's bitmap, clean or not.
//   - ring: a ring of dirtied pages per vCPU (KVM_CAP_DIRTY_LOG_RING),
//     collected and re-armed (KVM_RESET_DIRTY_RINGS) through
//     Slots.ReapRings. A harvest costs in proportion to the entries, not
//     to memory size. KVM then refuses the bitmap calls, and a vCPU whose
//     ring fills stops with KVM_EXIT_DIRTY_RING_FULL: the machine reaps
//     every ring into pages the next harvest reports, and the vCPU goes
//     on. On the hosts measured the ring's harvest costs more than the
//     bitmap's from 100 to 64k dirty pages (KVM re-arms ring entries more
//     slowly than bitmap words; bench checkpoint, harvest rows), so
//     "auto" takes the bitmap.
//
// It does not own the VM or its memory slots: the machine does, and hands
// out trackers with vmm.Machine.TrackDirty, one at a time, through the
// small Slots interface (start and stop logging, read and clear a slot's
// bitmap, reap the rings). No package but vmm holds the KVM VM file
// descriptor, or maps the rings.
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
//     exactly the pages written since the previous Harvest. So a
//     harvest with vCPUs running followed by one at the cut, ORed, is
//     exactly the pages written since the harvest before them: the
//     replicator's pre-harvest (replicate/preharvest.go) takes most of
//     a checkpoint's harvest out of its pause that way.
//
// # Goroutines
//
// A Tracker may be used from any goroutine; Harvest and Close serialise on
// a mutex. Harvest may run while vCPUs run (pre-copy rounds, the
// replicator's pre-harvest) and while
// devices write guest memory. A Set is plain data: it is not safe for
// concurrent mutation, and it is never shared by the Tracker after
// Harvest returns it. With rings, a vCPU stopped on a full ring reaps
// them from its own goroutine; the machine serialises that with Harvest.
package dirtylog
