package replicate

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// trackDirty starts dirty tracking on m's memory: KVM's dirty log (manual
// protect) ORed with the pages the VMM writes. The machine hands out one
// tracker at a time (vmm.ErrDirtyTrackingBusy otherwise).
func trackDirty(m *vmm.Machine) (*dirtylog.Tracker, error) {
	return m.TrackDirty(dirtylog.Options{ManualProtect: true})
}

// precopy is the pre-copy loop that both the initial sync of replication
// and live migration start with, while the guest runs, in KindInitialSync
// checkpoints.
//
// First the disks: each is read whole and sent, in checkpoints of at most
// diskSlab bytes. Then memory, round after round: the first round sends
// every page; each later one the pages dirtied during the one before.
// Dirty tracking and the disk logs started before the first byte was
// read, so a page written while it is being sent shows up in the next
// harvest, and a disk write made while its block is being copied travels
// after that copy: every checkpoint carries, after its pages and blocks,
// the disk writes recorded up to its end, and the standby applies them in
// order. At the end of the loop the standby's disks and memory equal the
// primary's up to what the caller's first paused checkpoint carries.
type precopy struct {
	t     Transport
	mem   *guestmem.Memory
	tr    *dirtylog.Tracker
	disks []*DiskLog
	// nextEpoch numbers each round (the caller owns epoch numbers).
	nextEpoch func() uint64
	// stopPages: stop once a round leaves at most this many dirty pages;
	// maxRounds: stop after this many rounds anyway (a guest dirtying
	// faster than the link never converges).
	stopPages, maxRounds int
	// onRound, if set, is told after each round how many pages it left
	// dirty.
	onRound func(round int, dirty int)
	// onCopied, if set, is told how many bytes of disk and memory the
	// loop has sent so far (round 0: the disks), every progressEvery
	// bytes and at the end of each round. It must not block.
	onCopied func(round int, copied uint64)
	// log, if set, gets one Debug line per round (its RoundStats).
	log *slog.Logger
}

// RoundStats is where one pre-copy round's time went, as measured by the
// source: the stream's counters before and after the round, and the
// clock around its steps.
type RoundStats struct {
	Round            int
	Pages, ZeroPages uint64 // sent in the round; ZeroPages of them as a flag
	WireBytes        uint64 // on the wire: frames, sealed
	// Send is BeginCheckpoint to EndCheckpoint: reading the pages, framing,
	// sealing and writing them. Seal and Write are the parts of it spent
	// sealing frames and writing them to the connection.
	Send, Seal, Write time.Duration
	Harvest           time.Duration // the dirty log after the round
	Dirty             int           // pages the harvest found dirty
}

// progressEvery is how often (in bytes sent) precopy reports progress.
const progressEvery = 4 << 20

// precopyResult is where the loop stopped.
type precopyResult struct {
	Rounds    int           // memory rounds
	Epoch     uint64        // the last checkpoint's epoch
	PagesSent uint64        // in all rounds
	DiskBytes uint64        // disk contents copied
	DiskHoles uint64        // of them, holes in the images, sent unread as zero runs
	Dirty     *dirtylog.Set // harvested after the last round, not sent yet
	Stats     []RoundStats  // one per memory round
}

// diskSlab is the most disk one initial-sync checkpoint copies, so that
// the standby commits (and syncs) the copy piecewise.
const diskSlab = 64 << 20

// run sends rounds until the dirty set is small, maxRounds have run, or
// ctx ends (its error). The pages still dirty go into the caller's next,
// paused, checkpoint.
func (p precopy) run(ctx context.Context) (precopyResult, error) {
	var res precopyResult
	if err := p.copyDisks(ctx, &res); err != nil {
		return res, err
	}
	set := dirtylog.NewFullSet(p.mem)
	for {
		res.Rounds++
		res.Epoch = p.nextEpoch()
		before, t0 := p.t.Stats(), time.Now()
		n, err := p.round(res.Epoch, set, func(sent uint64) {
			p.copied(res.Rounds, res.DiskBytes+(res.PagesSent+sent)*guestmem.PageSize)
		})
		t1 := time.Now()
		res.PagesSent += n
		p.copied(res.Rounds, res.DiskBytes+res.PagesSent*guestmem.PageSize)
		if err != nil {
			return res, fmt.Errorf("pre-copy round %d: %w", res.Rounds, err)
		}
		if set, err = p.tr.Harvest(); err != nil {
			return res, fmt.Errorf("pre-copy round %d: %w", res.Rounds, err)
		}
		after := p.t.Stats()
		rs := RoundStats{Round: res.Rounds, Pages: n, ZeroPages: after.ZeroPages - before.ZeroPages,
			WireBytes: after.BytesSent - before.BytesSent, Send: t1.Sub(t0),
			Seal: after.SealTime - before.SealTime, Write: after.WriteTime - before.WriteTime,
			Harvest: time.Since(t1), Dirty: set.Count()}
		res.Stats = append(res.Stats, rs)
		if p.log != nil {
			p.log.Debug("pre-copy round", "round", rs.Round, "pages", rs.Pages, "zero_pages", rs.ZeroPages,
				"wire_bytes", rs.WireBytes, "send", rs.Send, "seal", rs.Seal, "write", rs.Write,
				"harvest", rs.Harvest, "dirty", rs.Dirty)
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

// copied reports progress, if anyone listens.
func (p precopy) copied(round int, bytes uint64) {
	if p.onCopied != nil {
		p.onCopied(round, bytes)
	}
}

// round sends the pages of set, and the disk writes recorded meanwhile, as
// one initial-sync checkpoint. sent is told the pages sent so far every
// progressEvery bytes.
func (p precopy) round(epoch uint64, set *dirtylog.Set, sent func(pages uint64)) (uint64, error) {
	if err := p.t.BeginCheckpoint(epoch, stream.KindInitialSync); err != nil {
		return 0, err
	}
	n, err := sendPages(p.t, p.mem, set, sent)
	if err != nil {
		return n, err
	}
	if err := sendWrites(p.t, takeAll(p.disks)); err != nil {
		return n, err
	}
	return n, p.t.EndCheckpoint()
}

// copyDisks sends every disk's contents, slab by slab: the holes of its
// image as zero runs, unread (a disk write into a hole after its extent
// was looked up is in the disk log, like one into a block already read),
// the rest read and sent (its all-zero pieces as zero runs too).
func (p precopy) copyDisks(ctx context.Context, res *precopyResult) error {
	buf := make([]byte, stream.MaxDiskChunk)
	for i, d := range p.disks {
		for slab := int64(0); slab < d.Size(); slab += diskSlab {
			res.Epoch = p.nextEpoch()
			if err := p.t.BeginCheckpoint(res.Epoch, stream.KindInitialSync); err != nil {
				return fmt.Errorf("disk %d copy: %w", i, err)
			}
			end := min(slab+diskSlab, d.Size())
			for off := slab; off < end; {
				hole, until := d.extent(off, end)
				n := until - off
				if hole {
					if err := p.t.SendDiskZero(i, off, n); err != nil {
						return fmt.Errorf("disk %d copy: %w", i, err)
					}
					res.DiskHoles += uint64(n)
				} else {
					n = min(n, int64(len(buf)))
					if _, err := d.src.ReadAt(buf[:n], off); err != nil {
						return fmt.Errorf("disk %d copy: read at %d: %w", i, off, err)
					}
					if err := p.t.SendDisk(i, off, buf[:n]); err != nil {
						return fmt.Errorf("disk %d copy: %w", i, err)
					}
				}
				off += n
				res.DiskBytes += uint64(n)
				if res.DiskBytes%progressEvery < uint64(n) {
					p.copied(0, res.DiskBytes)
				}
			}
			if err := p.t.EndCheckpoint(); err != nil {
				return fmt.Errorf("disk %d copy: %w", i, err)
			}
			// The writes made while the slab was read, after it (in a
			// checkpoint of their own: each is bounded by the cap).
			if err := p.writesOnly(res); err != nil {
				return fmt.Errorf("disk %d copy: %w", i, err)
			}
			if err := ctx.Err(); err != nil {
				return err
			}
		}
	}
	return nil
}

// writesOnly sends the disk writes recorded since the last Take, if any,
// as an initial-sync checkpoint.
func (p precopy) writesOnly(res *precopyResult) error {
	w := takeAll(p.disks)
	if countWrites(w) == 0 {
		return nil
	}
	res.Epoch = p.nextEpoch()
	if err := p.t.BeginCheckpoint(res.Epoch, stream.KindInitialSync); err != nil {
		return err
	}
	if err := sendWrites(p.t, w); err != nil {
		return err
	}
	return p.t.EndCheckpoint()
}

func countWrites(w [][]DiskWrite) int {
	n := 0
	for _, ws := range w {
		n += len(ws)
	}
	return n
}

// sendPages sends the current contents of every page in set. sent, if
// set, is told the count every progressEvery bytes.
func sendPages(t Transport, mem *guestmem.Memory, set *dirtylog.Set, sent func(pages uint64)) (uint64, error) {
	var n uint64
	err := set.ForEach(func(gpa guestmem.GPA) error {
		page, err := mem.Slice(gpa, guestmem.PageSize)
		if err != nil {
			return err
		}
		n++
		if sent != nil && n%(progressEvery/guestmem.PageSize) == 0 {
			sent(n)
		}
		return t.SendPage(gpa, page)
	})
	return n, err
}
