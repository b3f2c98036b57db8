package replicate

import "time"

// Adaptive epochs (ReplicateConfig.MaxEpoch; seed notes §10b: the more a
// guest dirties, the slower its checkpoints). After each checkpoint the
// epoch loop looks at what the last one cost and sets the next epoch's
// length between Epoch and MaxEpoch:
//
//   - it doubles the length when the checkpoints fall behind: the pause
//     (its part that grows with the dirty set: harvest and copy) took
//     more than a tenth of the epoch (the guest loses more than 10 %
//     of its time stopped), the last acknowledged checkpoint took more
//     than half an epoch from resume to ack (the stream is about to lag:
//     the next one would be taken before it is acknowledged), or
//     MaxUnacked checkpoints are unacknowledged (the next one waits for
//     the standby). A longer epoch makes fewer checkpoints of pages the
//     guest writes again and again, so the pause and the stream cost less
//     of each second;
//   - it halves the length (down to Epoch) when the halved epoch would
//     still sit well below those marks: pause under a twentieth of it,
//     ack under a quarter, nothing waiting. The gap between the two marks
//     keeps the length from flapping at a steady load.
//
// The length aimed at never exceeds MaxEpoch, so held output waits at
// most MaxEpoch, a pause and an ack while the standby keeps up; streaming
// and backpressure (MaxUnacked) stretch epochs past their aim as they do
// fixed ones.
const (
	growPauseShare = 10 // grow when pause > epoch/growPauseShare
	growAckShare   = 2  // grow when ack > epoch/growAckShare
	shrinkPauseOf  = 20 // shrink when pause < (epoch/2)/shrinkPauseOf
	shrinkAckOf    = 4  // shrink when ack < (epoch/2)/shrinkAckOf
)

// epochLoad is what the last checkpoint cost, as the loop sees it.
type epochLoad struct {
	Pause time.Duration // the last checkpoint's pause, its dirty-set part (harvest, copy)
	Ack   time.Duration // the last acknowledged checkpoint's time to ack
	// Behind: MaxUnacked checkpoints are unacknowledged, or the loop
	// just waited for the standby (backpressure).
	Behind bool
}

// nextEpoch is the length of the epoch after one of length cur, within
// [lo, hi]; with hi <= lo (fixed epochs), always lo.
func nextEpoch(cur, lo, hi time.Duration, l epochLoad) time.Duration {
	if hi <= lo {
		return lo
	}
	cur = min(max(cur, lo), hi)
	if l.Behind || l.Pause > cur/growPauseShare || l.Ack > cur/growAckShare {
		return min(2*cur, hi)
	}
	half := max(cur/2, lo)
	if half < cur && l.Pause < half/shrinkPauseOf && l.Ack < half/shrinkAckOf {
		return half
	}
	return cur
}

// adapt sets the next epoch's length from the last checkpoint's pause
// (the part that grows with the dirty set: harvest and copy; stopping and
// resuming the vCPUs cost the same at any epoch, and on a busy host they
// swing with the scheduler, not with the guest), the last acknowledged
// one's time to ack and whether checkpoints are
// waiting for the standby (waited: the loop just did), and returns it.
// With fixed epochs it is always cfg.Epoch.
func (r *Replicator) adapt(waited bool) time.Duration {
	if r.cfg.MaxEpoch == 0 {
		return r.cfg.Epoch
	}
	epoch := r.currentEpoch()
	l := epochLoad{Behind: waited || r.t.Acked()+uint64(r.cfg.MaxUnacked) <= epoch}
	r.mu.Lock()
	defer r.mu.Unlock()
	if n := len(r.recent); n > 0 {
		l.Pause = r.recent[n-1].Harvest + r.recent[n-1].Copy
	}
	for i := len(r.recent) - 1; i >= 0; i-- {
		if r.recent[i].AckTime > 0 {
			l.Ack = r.recent[i].AckTime
			break
		}
	}
	r.target = nextEpoch(r.target, r.cfg.Epoch, r.cfg.MaxEpoch, l)
	return r.target
}
