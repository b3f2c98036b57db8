package replicate

import (
	"fmt"

	"govmm/dirtylog"
	"govmm/vmm/guestmem"
)

// How a checkpoint takes the guest's dirty pages (stop-and-copy or
// copy-on-write, ReplicateConfig.Copy; with CopyAuto chosen per
// checkpoint by the size of its dirty set) and streams them.

// copyOnWrite sets up copy-on-write checkpoints as the config asks: nil
// for stop-and-copy (asked for, or CopyAuto where the host cannot: said
// once in the log).
func (r *Replicator) copyOnWrite() (*guestmem.Protector, error) {
	if r.cfg.Copy == CopyStop {
		return nil, nil
	}
	p, err := guestmem.NewProtector(r.m.Memory())
	if err == nil {
		r.log.Debug("checkpoints copy on write")
		// A vCPU that writes an armed page between a pause's kick and
		// its exit waits for the fault's resolution: the pause's poll
		// resolves it at once (vmm.Machine.SetPauseHelper).
		r.m.SetPauseHelper(p.ResolvePending)
		return p, nil
	}
	if r.cfg.Copy == CopyCoW {
		return nil, fmt.Errorf("copy-on-write checkpoints: %w", err)
	}
	r.log.Info("checkpoints stop the guest to copy its pages: copy-on-write is unavailable here", "why", err)
	return nil, nil
}

// copiesOnWrite says whether a checkpoint of n dirty pages copies on
// write: never without a Protector, always with CopyCoW, and with
// CopyAuto from cfg.CoWPages pages on. Below that, stop-and-copy's pause
// is at most about a millisecond longer (the copy, about 0.25 µs a page,
// against copy-on-write's write-protection) and its ack sooner: copying on
// write, the copy runs after the resume, in the way of shipping, and
// slower (the guest faults on the pages it writes again at once); in
// govmm bench checkpoint, copy-on-write's pause plus time to ack passed
// below stop-and-copy's between 4k and 8k dirty pages (DefaultCoWPages).
func (r *Replicator) copiesOnWrite(n int) bool {
	switch {
	case r.cow == nil:
		return false
	case r.cfg.Copy == CopyCoW:
		return true
	}
	return n >= r.cfg.CoWPages
}

// closeCoW un-protects guest memory and stops the fault handler; every
// checkpoint has finished its copy by then.
func (r *Replicator) closeCoW() {
	if r.cow == nil {
		return
	}
	r.m.SetPauseHelper(nil)
	if err := r.cow.Close(); err != nil {
		r.log.Warn("copy-on-write: close", "err", err)
	}
}

// stage copies the pages of set into the staging buffer, and where
// guestmem.PageSumFast() sums each as it copies it, at no extra cost
// (guestmem.BenchmarkCopyPage), so that the stream need not read it
// again to sum it (SendSummedPage). The buffer is reused from epoch to
// epoch (streaming of the previous one is over by now): no page faults
// in the pause.
func (r *Replicator) stage(set *dirtylog.Set) error {
	mem := r.m.Memory()
	r.gpas = r.gpas[:0]
	r.sizeStaging(set.Count())
	i := 0
	err := set.ForEach(func(gpa guestmem.GPA) error {
		page, err := mem.Slice(gpa, guestmem.PageSize)
		if err != nil {
			return err
		}
		if (i+1)*guestmem.PageSize > len(r.staging) {
			return fmt.Errorf("stage: more dirty pages than the set counts (%d)", i)
		}
		r.gpas = append(r.gpas, gpa)
		dst := r.staging[i*guestmem.PageSize : (i+1)*guestmem.PageSize]
		if r.sums != nil {
			guestmem.CopyPageSummed(dst, page, &r.sums[i])
		} else {
			copy(dst, page)
		}
		i++
		return nil
	})
	r.staging = r.staging[:i*guestmem.PageSize]
	return err
}

// sizeStaging makes the staging buffer (and sums, where pages are summed
// as they are copied) hold n pages, growing them with room for a few
// more next time.
func (r *Replicator) sizeStaging(n int) {
	if cap(r.staging) < n*guestmem.PageSize {
		r.staging = make([]byte, (n+n/4)*guestmem.PageSize)
	}
	r.staging = r.staging[:n*guestmem.PageSize]
	if !guestmem.PageSumFast() {
		return
	}
	if cap(r.sums) < n {
		r.sums = make([]guestmem.PageSum, n+n/4)
	}
	r.sums = r.sums[:n]
}

// protect sizes the staging buffer for the pages of set and
// write-protects them (those Arm has not): the snapshot copies them there
// (summing them where guestmem.PageSumFast()) once the guest has resumed.
// The pause spends nothing per page here but the protection of pages Arm
// did not predict.
func (r *Replicator) protect(set *dirtylog.Set) (*guestmem.Snapshot, error) {
	r.sizeStaging(set.Count())
	if r.sums != nil {
		return r.cow.BeginSummed(set, r.staging, r.sums)
	}
	return r.cow.Begin(set, r.staging)
}

// send streams the staged checkpoint, begun before its pause
// (checkpoint); copying on write, each page as soon as snap has copied it. The staging buffer stays as it is until the
// next pause, which comes after send returns: its pages are stable
// (SendStablePage).
func (r *Replicator) send(state []byte, snap *guestmem.Snapshot) error {
	if snap != nil {
		if err := snap.SummedPages(r.t.SendSummedPage); err != nil {
			return err
		}
		// A snapshot that cannot be trusted (its fault handler failed)
		// must not become a checkpoint.
		if _, err := snap.Wait(); err != nil {
			return err
		}
	} else {
		for i, gpa := range r.gpas {
			var ps *guestmem.PageSum
			if r.sums != nil {
				ps = &r.sums[i]
			}
			if err := r.t.SendSummedPage(gpa, r.staging[i*guestmem.PageSize:(i+1)*guestmem.PageSize], ps); err != nil {
				return err
			}
		}
	}
	if err := sendWrites(r.t, r.writes); err != nil {
		return err
	}
	r.writes = nil
	if err := r.t.SendState(state); err != nil {
		return err
	}
	return r.t.EndCheckpoint()
}
