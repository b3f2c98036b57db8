package replicate

import (
	"context"
	"fmt"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// trackDirty starts dirty tracking on m's memory: KVM's dirty log (manual
// protect) ORed with the pages the VMM writes.
func trackDirty(m *vmm.Machine) (*dirtylog.Tracker, error) {
	return dirtylog.New(m.VM(), m.Memory(), dirtylog.Options{ManualProtect: true})
}

// precopy is the pre-copy loop that both the initial sync of replication
// and live migration start with: the guest's memory is sent while it runs,
// round after round, each round a KindInitialSync checkpoint. The first
// round sends every page; each later one the pages dirtied during the one
// before. Tracking started before the first page was read, so a page
// written while it is being sent shows up in the next harvest.
type precopy struct {
	t   Transport
	mem *guestmem.Memory
	tr  *dirtylog.Tracker
	// nextEpoch numbers each round (the caller owns epoch numbers).
	nextEpoch func() uint64
	// stopPages: stop once a round leaves at most this many dirty pages;
	// maxRounds: stop after this many rounds anyway (a guest dirtying
	// faster than the link never converges).
	stopPages, maxRounds int
	// onRound, if set, is told after each round how many pages it left
	// dirty.
	onRound func(round int, dirty int)
}

// precopyResult is where the loop stopped.
type precopyResult struct {
	Rounds    int
	Epoch     uint64        // the last round's epoch
	PagesSent uint64        // in all rounds
	Dirty     *dirtylog.Set // harvested after the last round, not sent yet
}

// run sends rounds until the dirty set is small, maxRounds have run, or
// ctx ends (its error). The pages still dirty go into the caller's next,
// paused, checkpoint.
func (p precopy) run(ctx context.Context) (precopyResult, error) {
	var res precopyResult
	set := dirtylog.NewFullSet(p.mem)
	for {
		res.Rounds++
		res.Epoch = p.nextEpoch()
		n, err := p.round(res.Epoch, set)
		res.PagesSent += n
		if err != nil {
			return res, fmt.Errorf("pre-copy round %d: %w", res.Rounds, err)
		}
		if set, err = p.tr.Harvest(); err != nil {
			return res, fmt.Errorf("pre-copy round %d: %w", res.Rounds, err)
		}
		res.Dirty = set
		if p.onRound != nil {
			p.onRound(res.Rounds, set.Count())
		}
		if set.Count() <= p.stopPages || res.Rounds >= p.maxRounds {
			return res, nil
		}
		if err := ctx.Err(); err != nil {
			return res, err
		}
	}
}

// round sends the pages of set as one initial-sync checkpoint.
func (p precopy) round(epoch uint64, set *dirtylog.Set) (uint64, error) {
	if err := p.t.BeginCheckpoint(epoch, stream.KindInitialSync); err != nil {
		return 0, err
	}
	n, err := sendPages(p.t, p.mem, set)
	if err != nil {
		return n, err
	}
	return n, p.t.EndCheckpoint()
}

// sendPages sends the current contents of every page in set.
func sendPages(t Transport, mem *guestmem.Memory, set *dirtylog.Set) (uint64, error) {
	var n uint64
	err := set.ForEach(func(gpa guestmem.GPA) error {
		page, err := mem.Slice(gpa, guestmem.PageSize)
		if err != nil {
			return err
		}
		n++
		return t.SendPage(gpa, page)
	})
	return n, err
}
