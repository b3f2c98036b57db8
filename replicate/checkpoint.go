package replicate

// One checkpoint of the primary's loop: the pause that cuts it and the
// shipping while the guest runs on.

import (
	"context"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm/guestmem"
)

// checkpoint takes one checkpoint: pre-harvest and arm (beforePause,
// the guest running), number the epoch and begin it on the transport (its
// Begin goes out now, so that a standby idle since the last checkpoint
// wakes while the pause runs), pause, harvest (ORed with the pre-harvest and
// extra), take the dirty pages (copy them into the staging buffer, or,
// copying on write, write-protect them: copiesOnWrite chooses by the
// dirty set), save the state, take the disk writes, seal the epoch's
// output, resume; then stream it while the guest runs
// on (copying on write, the pages are copied meanwhile, each before the
// guest may change it: the staging buffer holds them as of the cut).
func (r *Replicator) checkpoint(extra *dirtylog.Set) error {
	var es EpochStats
	pre, preTook, err := r.beforePause() // part of the epoch, not of the pause
	if err != nil {
		return err
	}
	es.PreHarvest = preTook
	epoch := r.nextEpoch()
	if err := r.t.BeginCheckpoint(epoch, stream.KindEpoch); err != nil {
		return err
	}
	t0 := time.Now()
	r.mu.Lock()
	if !r.lastResumed.IsZero() {
		es.Length = t0.Sub(r.lastResumed)
	}
	r.mu.Unlock()
	c, err := r.cut(epoch, pre, extra)
	now := time.Now()
	// The pause, as the guest feels it, ends at the last vCPU's answer to
	// the resume: this goroutine may have waited for a P since
	// (vmm.ResumedAt; 7-20 ms on a busy host, ~80 µs on an idle one).
	// The epoch's timing and the time to ack still count from now.
	resumed := now
	if at := r.m.ResumedAt(); err == nil && at.After(c.t3) && at.Before(now) {
		resumed = at
	}
	if c.snap != nil {
		// Protected pages are copied and let go whatever happens next:
		// no guest write may wait on a checkpoint that is not sent.
		go c.snap.Copy()
	} else if r.cow != nil {
		// No Begin (copied while stopped, or an error): let the armed
		// pages go, and drop the last snapshot's pages as the
		// prediction: should a later checkpoint copy on write, it arms
		// what its pre-harvest finds, not pages of an older epoch.
		r.cow.Disarm()
		r.cow.Forget()
	}
	r.lastCoW = c.snap != nil
	es.CopyMode = string(CopyStop)
	if c.snap != nil {
		es.CopyMode = string(CopyCoW)
	}
	if err != nil {
		if c.snap != nil {
			_, _ = c.snap.Wait()
		}
		return err
	}
	es.Epoch, es.DirtyPages = c.epoch, len(r.gpas)
	if c.snap != nil {
		es.DirtyPages = c.snap.Len()
	}
	es.Stop, es.Harvest, es.Copy, es.State, es.Pause = c.ts.Sub(t0), c.t1.Sub(c.ts), c.t2.Sub(c.t1), c.t3.Sub(c.t2), resumed.Sub(t0)
	r.mu.Lock()
	r.lastResumed = now
	r.resumedAt[c.epoch] = now
	r.mu.Unlock()
	return r.ship(c, now, es)
}

// cutResult is what one checkpoint's pause produced: the epoch's number,
// its device state, its copy-on-write snapshot (nil with stop-and-copy)
// and when each step of the pause ended (stop, harvest, copy, state).
type cutResult struct {
	epoch          uint64
	state          []byte
	snap           *guestmem.Snapshot
	ts, t1, t2, t3 time.Time
}

// cut is checkpoint epoch's pause: harvest (pre and extra ORed in), copy
// the dirty pages into the staging buffer or write-protect them (as
// copiesOnWrite says for the harvested set), save the
// state, take the disk writes and seal the epoch's output. A
// snapshot taken before a later step failed is returned with the error:
// its pages must still be let go.
func (r *Replicator) cut(epoch uint64, pre, extra *dirtylog.Set) (cutResult, error) {
	c := cutResult{epoch: epoch}
	err := r.m.WithPaused(context.Background(), func() error {
		c.ts = time.Now()
		if r.hooks.inPause != nil {
			defer r.hooks.inPause()()
		}
		// The vCPU threads read their registers while this goroutine
		// harvests and copies: the same cut, the two overlapped.
		var err error
		c.state, r.writes, err = cutState(r.m, r.cfg.Disks, func() error {
			set, err := r.tr.Harvest()
			if err != nil {
				return err
			}
			for _, s := range []*dirtylog.Set{pre, extra} {
				if s != nil {
					set.Or(s)
				}
			}
			c.t1 = time.Now()
			if r.copiesOnWrite(set.Count()) {
				c.snap, err = r.protect(set)
			} else {
				err = r.stage(set)
			}
			c.t2 = time.Now()
			return err
		})
		if err != nil {
			return err
		}
		if r.hooks.atCut != nil {
			r.hooks.atCut(c.epoch)
		}
		if r.hooks.atCutCopy != nil {
			r.hooks.atCutCopy(c.epoch, c.snap != nil)
		}
		if err := r.sealOutput(c.epoch); err != nil {
			return err
		}
		c.t3 = time.Now()
		return nil
	})
	return c, err
}

// ship streams checkpoint c, cut when the guest resumed at now, while the
// guest runs on; with copy-on-write it then waits for c's background copy,
// so that the next pause starts only once every page of this one is
// copied and un-protected. It records es once the checkpoint is sent.
func (r *Replicator) ship(c cutResult, now time.Time, es EpochStats) error {
	before := r.t.Stats().BytesSent
	r.resumable.Store(true)
	err := r.send(c.state, c.snap)
	if c.snap != nil {
		done, werr := c.snap.Wait()
		es.Background = done.Sub(now)
		if err == nil {
			err = werr
		}
	}
	if err != nil {
		return err
	}
	es.Bytes = r.t.Stats().BytesSent - before
	r.record(es)
	return nil
}

// sealOutput ends the guest's output epoch at checkpoint epoch's cut. At
// the first resumable checkpoint it arms the buffers instead: output from
// then on waits for acks.
func (r *Replicator) sealOutput(epoch uint64) error {
	first := !r.isProtected()
	for _, o := range r.cfg.Outputs {
		if first {
			o.Arm(epoch)
			continue
		}
		if err := o.Seal(epoch); err != nil {
			return err
		}
	}
	return nil
}
