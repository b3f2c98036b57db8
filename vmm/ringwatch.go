package vmm

import (
	"sync"
	"time"

	"govmm/kvmapi"
)

// Reaping the dirty rings between harvests.
//
// KVM stops a vCPU whose ring is nearly full (ExitDirtyRingFull), and
// dirtyRingFull reaps it. Not every KVM does in time: kvm_pvm (the hosts
// this project is developed on) exits for a full ring only now and then
// (a tiny guest's two spinning vCPUs made one such exit in 2 s, after the
// other vCPU's ring had lapped), and pushes an
// entry for every write, not only the first after a reset (a tiny guest
// rewriting 513 pages filled 34,000-46,000 entries in 200 ms): a 64k-entry
// ring laps in about 0.3 s, and a harvest that comes later finds entries
// overwritten (ErrDirtyRingOverflow). The initial sync's first pre-copy
// round on a loaded host takes longer than that.
//
// So on kvm_pvm each vCPU thread looks at them every ringTickEvery of
// its own CPU time (cputimer.go), which keeps pace with its guest however
// loaded the host is; and while a tracker logs into the rings, a watcher
// looks at them every ringWatchEvery. Either reaps every ring into the
// tracker's pending pages (as a ring-full exit does) once any ring holds
// watchThreshold entries: a quarter of its entries on kvm_pvm. Elsewhere
// KVM stops the vCPU at the ring's soft limit, no vCPU ticks, and the
// watcher acts only on a ring past that limit, which a KVM that stops its
// vCPUs never shows: ring-full exits stay KVM's (a lab guest that fills
// 1,024 entries in more than 10 ms never met one while the watcher reaped
// at half). A look is one load per ring, under m.ring.mu.

// ringWatchEvery is how often the watcher looks: a ring of 64k entries
// that kvm_pvm fills at ~230,000 entries a second goes from a quarter
// full to lapped in 210 ms, which leaves the watcher that long to get a
// CPU. With the watcher alone, reaping at half (140 ms), a clean-clone CI
// run on 2026-12-02 (two spinning vCPUs beside other packages' tests)
// lost a ring in the initial sync; hence the vCPUs' own ticks.
const ringWatchEvery = 5 * time.Millisecond

// ringReserved is KVM's KVM_DIRTY_RING_RSVD_ENTRIES: a ring is soft-full
// (its vCPU stops) at its size less these and the CPU's PML buffer.
const ringReserved = 64

// watchThreshold is how many entries a ring of entries holds before the
// watcher reaps it: a quarter where KVM seldom stops the vCPU; elsewhere
// more than the soft limit (entries − 64 − PML's 512 at most) leaves room
// for.
func watchThreshold(entries int) int {
	if kvmapi.IsPVM() { // seldom stops a vCPU on a full ring
		return entries / 4
	}
	return entries - ringReserved/2
}

// ringWatch is a running watcher.
type ringWatch struct {
	stop chan struct{}
	done sync.WaitGroup
}

// watchRings starts the watcher for d, the open tracker's side.
func (d *dirtySlots) watchRings() {
	if d.m.ring.noWatcher {
		return
	}
	w := &ringWatch{stop: make(chan struct{})}
	d.watch = w
	w.done.Add(1)
	go func() {
		defer w.done.Done()
		t := time.NewTicker(ringWatchEvery)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				d.reapIfFilling()
			}
		}
	}()
}

// stopWatching stops the watcher, if any, and waits for it.
func (d *dirtySlots) stopWatching() {
	if w := d.watch; w != nil {
		close(w.stop)
		w.done.Wait()
		d.watch = nil
	}
}

// reapRingsIfFilling is the watcher's look (reapIfFilling) for the open
// tracker, if any, from a vCPU's thread at its tick (cputimer.go).
func (m *Machine) reapRingsIfFilling() {
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	if d := m.ring.active; d != nil {
		d.reapIfFillingLocked()
	}
}

// vcpuTicks says whether the vCPU threads look at the rings on their own
// CPU clock too (cputimer.go): where KVM seldom stops a vCPU on a full
// ring, unless a test turned them off.
func (r *dirtyRings) vcpuTicks() bool { return kvmapi.IsPVM() && !r.noTicks }

// reapIfFilling reaps every ring into d's pending pages when one holds
// watchThreshold entries. An error (the rings overflowed already) is kept for
// the next harvest to report.
func (d *dirtySlots) reapIfFilling() {
	d.m.ring.mu.Lock()
	defer d.m.ring.mu.Unlock()
	if d.m.ring.active == d {
		d.reapIfFillingLocked()
	}
}

// reapIfFillingLocked is reapIfFilling for the open tracker's side, with
// m.ring.mu held.
func (d *dirtySlots) reapIfFillingLocked() {
	m := d.m
	if m.ring.closed || d.watchErr != nil {
		return
	}
	for _, r := range m.ring.rings {
		if r.Holds(watchThreshold(r.Entries())) {
			if _, err := m.reapLocked(d.addPending); err != nil {
				d.watchErr = err
			}
			d.watchReaps++
			return
		}
	}
}
