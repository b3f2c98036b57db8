package vmm

import (
	"sync"
	"time"
)

// Reaping the dirty rings between harvests.
//
// KVM stops a vCPU whose ring is nearly full (ExitDirtyRingFull), and
// dirtyRingFull reaps it. Not every KVM does: kvm_pvm (the hosts this
// project is developed on) never exits for a full ring, and pushes an
// entry for every write, not only the first after a reset (a tiny guest
// rewriting 513 pages filled 34,000-46,000 entries in 200 ms): a 64k-entry
// ring laps in about 0.3 s, and a harvest that comes later finds entries
// overwritten (ErrDirtyRingOverflow). The initial sync's first pre-copy
// round on a loaded host takes longer than that.
//
// So while a tracker logs into the rings, a watcher looks at them every
// ringWatchEvery and reaps them into the tracker's pending pages (as a
// ring-full exit does) once any ring holds half its entries. Where KVM
// stops the vCPUs itself it mostly finds nothing to do: a look is one
// load per ring, under m.ring.mu.

// ringWatchEvery is how often the watcher looks: a ring of 64k entries
// that kvm_pvm fills at ~230,000 entries a second is half full in 140 ms.
const ringWatchEvery = 10 * time.Millisecond

// ringWatch is a running watcher.
type ringWatch struct {
	stop chan struct{}
	done sync.WaitGroup
}

// watchRings starts the watcher for d, the open tracker's side.
func (d *dirtySlots) watchRings() {
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
				d.reapIfHalfFull()
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

// reapIfHalfFull reaps every ring into d's pending pages when one holds
// half its entries. An error (the rings overflowed already) is kept for
// the next harvest to report.
func (d *dirtySlots) reapIfHalfFull() {
	m := d.m
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	if m.ring.closed || m.ring.active != d || d.watchErr != nil {
		return
	}
	for _, r := range m.ring.rings {
		if r.Holds(r.Entries() / 2) {
			if _, err := m.reapLocked(d.addPending); err != nil {
				d.watchErr = err
			}
			d.watchReaps++
			return
		}
	}
}
