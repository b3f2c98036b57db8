package replicate

import (
	"time"

	"govmm/dirtylog"
)

// Pre-harvest: most of the dirty-log harvest is taken out of the pause.
//
// A harvest costs in proportion to the pages it reports (KVM re-protects
// each one: KVM_CLEAR_DIRTY_LOG, or KVM_RESET_DIRTY_RINGS), so just
// before the pause, with the guest running, beforePause harvests once
// (collect and clear: KVM logs the writes after it again), and the pause
// harvests only what was written since, a few pages, and ORs the two.
//
// Why the union is exactly the pages written since the last cut: the
// last pause ended with a harvest with the guest stopped, so the log
// starts clean at the cut. A page written before the pre-harvest is in
// its set, one written after it is in the pause's, and a write that
// races with the pre-harvest is in one of them (Tracker.Harvest: never in
// neither, as long as the page's bytes are read after that harvest; they
// are read at or after the cut). Both hold for every source: the bitmap
// (with or without manual protect), the rings (the pre-harvest is a reap
// and reset; a vCPU stopped on a full ring reaps into pages the next
// harvest reports) and the VMM's own bitmap (guestmem writes the bytes,
// then marks; the harvest swaps each word with zero). The union holds no
// page not written since the cut, either: each set does not.
//
// What is read of each page is its bytes at the cut, not at the
// pre-harvest, although a page of the first set may be written again
// between the two (it then is in the second set too; the union does not
// care):
//
//   - stop-and-copy: the union is copied in the pause, with the guest
//     stopped;
//   - copy-on-write: nothing is copied before the cut. Last epoch's
//     pages are armed just before the pre-harvest, and the pre-harvested
//     pages not among them right after it (Protector.Arm), the guest
//     running; one written before the cut is let through and noted as
//     touched, and Begin, in the pause, protects every page of
//     the union that is not armed or was touched. So every page of the
//     union is protected when the guest resumes, and copied before it
//     changes, as without a pre-harvest; arming the first set only saves
//     Begin the protection of the pages the guest did not write again.

// beforePause runs just before a checkpoint's pause, with the guest
// running: copying on write, it arms the protection of last epoch's
// pages; it pre-harvests the dirty log (unless cfg.NoPreHarvest) and,
// copying on write, arms the pre-harvested pages not armed yet (few: a
// guest dirties much the same pages from epoch to epoch). With CopyAuto
// the checkpoint's mode is chosen in the pause (copiesOnWrite), so it
// arms only where copy-on-write is likely: last epoch's pages if last
// epoch copied on write, the pre-harvested ones then too or if they are
// enough to copy on write on their own (the pause's set holds them). A
// checkpoint that then stops to copy lets the armed pages go after its
// pause (checkpoint); one that copies on write unarmed protects its
// whole set in the pause (Begin), once, as the first epoch does. Arming last
// epoch's pages first keeps the pre-harvest close to the pause: what the
// guest writes in between is left to the pause's harvest. It returns the
// pre-harvested set (nil without) and how long the harvest took.
func (r *Replicator) beforePause() (*dirtylog.Set, time.Duration, error) {
	armLast := r.cow != nil && (r.cfg.Copy == CopyCoW || r.lastCoW)
	if armLast {
		if err := r.cow.Arm(nil); err != nil {
			return nil, 0, err
		}
	}
	if r.hooks.preHarvest != nil {
		r.hooks.preHarvest(r.currentEpoch() + 1)
	}
	var (
		pre  *dirtylog.Set
		took time.Duration
	)
	if !r.cfg.NoPreHarvest {
		start := time.Now()
		set, err := r.tr.Harvest()
		if err != nil {
			r.disarm()
			return nil, 0, err
		}
		pre, took = set, time.Since(start)
		if armLast || r.copiesOnWrite(pre.Count()) {
			if err := r.cow.Arm(pre); err != nil {
				return nil, 0, err
			}
		}
	}
	if r.hooks.beforePause != nil {
		r.hooks.beforePause(r.currentEpoch()+1, pre)
	}
	return pre, took, nil
}

// disarm lets the armed pages go when no pause follows the arming.
func (r *Replicator) disarm() {
	if r.cow != nil {
		r.cow.Disarm()
	}
}
