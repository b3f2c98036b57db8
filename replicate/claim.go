package replicate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"govmm/replicate/stream"
	"govmm/replicate/witness"
)

// This file is the standby's side of the witness (docs/FENCING.md): which
// sources it serves, the claim of the next generation before a replica
// runs, and what it knows meanwhile (Status, Metrics).

// checkWitness refuses a source whose use of a witness differs from this
// standby's: a guest protected through a witness must not be taken over
// without one, and a standby that takes over only through one cannot
// serve a source that holds no generation.
func (sb *Standby) checkWitness(peer stream.Identity) error {
	w := sb.cfg.Witness
	switch {
	case w == nil && peer.Generation != 0:
		return fmt.Errorf("%w: the source holds generation %d of %s at a witness and this standby has none: it could run the guest without the witness's consent (start it with --witness)",
			stream.ErrMismatch, peer.Generation, peer.Name)
	case w == nil:
		return nil
	case peer.Generation == 0:
		return fmt.Errorf("%w: the source has no witness and this standby runs a guest only through one (%s): start the source with --witness",
			stream.ErrMismatch, w.Addr())
	case peer.Name != w.VM():
		return fmt.Errorf("%w: the source's VM is %q and this standby's is %q at the witness (give both the same --name)",
			stream.ErrMismatch, peer.Name, w.VM())
	}
	return nil
}

// takeGeneration wins, with a witness, the generation after the source's
// (peer.Generation) before the replica rep runs the guest, and returns
// the Fence that holds it, with the replica's outputs gated on it; how
// long it took is claimed. Without a witness it returns nil.
//
// While the witness does not answer (or keeps the old lease), the replica
// is kept and the claim retried, for as long as ctx lasts, and Status says
// that failover is impossible and why. A newer generation (the primary
// went on without this standby, or another standby won) or a primary that
// renews its lease meanwhile (it is alive: only this standby lost it)
// means this standby must not run the guest: the error wraps
// errListenAgain.
func (sb *Standby) takeGeneration(ctx context.Context, peer stream.Identity, rep *Replica) (*Fence, time.Duration, error) {
	w := sb.cfg.Witness
	if w == nil {
		return nil, 0, nil
	}
	start := time.Now()
	base := peer.Generation
	attempt := 2*w.LeaseAsked() + sb.cfg.FailoverTimeout
	for n := 1; ; n++ {
		sb.setClaiming(base, "")
		actx, cancel := context.WithTimeout(ctx, attempt)
		lease, err := w.Claim(actx, base)
		cancel()
		switch {
		case err == nil:
			sb.log.Info("won the next generation at the witness: taking over", "generation", lease.Generation(),
				"claim", time.Since(start))
			var outs []*OutputBuffer
			for _, n := range rep.NICs {
				outs = append(outs, n.Out)
			}
			f := NewFence(FenceConfig{Lease: lease, Witness: w.Addr(), Machine: rep.Machine, Outputs: outs,
				Disks: rep.Disks, Logger: sb.cfg.Logger})
			return f, time.Since(start), nil
		case ctx.Err() != nil:
			return nil, 0, ctx.Err()
		case errors.Is(err, witness.ErrSuperseded):
			return nil, 0, fmt.Errorf("standby: not taking over: a newer generation exists, this replica is stale: %w: %w", err, errListenAgain)
		case errors.Is(err, witness.ErrHolderAlive):
			return nil, 0, fmt.Errorf("standby: not taking over: the primary is alive at the witness (it renews its lease): %w: %w", err, errListenAgain)
		}
		sb.setClaiming(base, err.Error())
		if n == 1 {
			sb.log.Error("PRIMARY LOST, FAILOVER IMPOSSIBLE for now: the witness does not grant the next generation; keeping the replica and claiming again",
				"generation", base+1, "err", err)
		} else if n%10 == 0 {
			sb.log.Warn("still claiming the next generation at the witness", "generation", base+1, "attempts", n, "err", err)
		}
		select {
		case <-time.After(w.LeaseAsked() / 4):
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

// Standby phases (StandbyStatus.Phase).
const (
	PhaseListening   = "listening"   // waiting for a source
	PhaseReplicating = "replicating" // following a primary (or a migration)
	PhaseClaiming    = "claiming"    // primary lost: claiming the next generation
	PhaseRunning     = "running"     // the guest runs here
)

// standbyState is what Status reports from; Standby.mu guards it.
type standbyState struct {
	phase      string
	source     string // the source's VM name and holder
	generation uint64 // the source's
	epoch      uint64 // last resumable checkpoint committed
	outcome    string // how the last source ended, if it did
	claimErr   string // the last failed claim, while claiming

	peerAddr    string           // the current (or last) source's address
	committedAt time.Time        // when epoch committed
	recv        *stream.Receiver // the current source's stream, or nil
	bytesDone   uint64           // received from the sources before recv
	streamDone  stream.Stats     // their counters (addReceived)

	queried   bool // the witness was asked at least once
	reachable bool
	record    witness.Record
	queryErr  string
	checked   time.Time
}

// StandbyStatus is what a standby knows, for ctl info and metrics.
type StandbyStatus struct {
	Phase      string
	Source     string // the source being followed (its VM name, holder at the witness)
	Generation uint64 // the source's generation at the witness (0: none)
	Epoch      uint64 // last resumable checkpoint committed
	Outcome    string // how the last source ended, if it did
	// Peer is the current (or last) source's address, host:port.
	Peer string
	// LastCommit is when checkpoint Epoch committed (zero before the
	// first); Lag is the time since, while a source is followed (zero
	// otherwise): a lag well past the source's epoch means the stream
	// stalls.
	LastCommit time.Time
	Lag        time.Duration
	// BytesReceived counts the stream bytes received from every source.
	BytesReceived uint64
	// Stream holds the pages and disk bytes received from every source
	// (addReceived) and the current source's codec and deltas
	// (Compression is "" without a source).
	Stream stream.Stats
	// Witness is the witness's address ("" without one); Reachable says
	// whether it answered the last question, Record what it said, Err why
	// not.
	Witness   string
	Reachable bool
	Record    witness.Record
	Err       string
	// FailoverPossible says whether this standby would take over if its
	// primary were lost now; Reason says why not (or, without a witness,
	// what that risks).
	FailoverPossible bool
	Reason           string
}

// Status is what the standby knows now.
func (sb *Standby) Status() StandbyStatus {
	sb.mu.Lock()
	st := sb.st
	sb.mu.Unlock()
	out := StandbyStatus{Phase: st.phase, Source: st.source, Generation: st.generation, Epoch: st.epoch,
		Outcome: st.outcome, Reachable: st.reachable, Record: st.record, Err: st.queryErr,
		Peer: st.peerAddr, LastCommit: st.committedAt, BytesReceived: st.bytesDone}
	out.Stream = st.streamDone
	if st.recv != nil {
		rs := st.recv.Stats()
		out.BytesReceived += rs.BytesReceived
		addReceived(&out.Stream, rs)
		out.Stream.Compression, out.Stream.Deltas, out.Stream.Cipher = rs.Compression, rs.Deltas, rs.Cipher
		if !st.committedAt.IsZero() {
			out.Lag = time.Since(st.committedAt)
		}
	}
	w := sb.cfg.Witness
	if w != nil {
		out.Witness = w.Addr()
	}
	switch {
	case st.phase == PhaseRunning:
		out.Reason = "the guest runs here"
	case st.phase == PhaseClaiming && st.claimErr != "":
		out.Reason = "failover impossible for now: primary lost, the witness does not grant the next generation (" + st.claimErr + "); claiming again"
	case st.phase == PhaseClaiming:
		out.Reason = fmt.Sprintf("primary lost: claiming generation %d at the witness", st.generation+1)
	case st.phase == PhaseListening:
		out.Reason = "no primary"
	case st.epoch == 0:
		out.Reason = "no checkpoint yet"
	case w == nil:
		out.FailoverPossible = true
		out.Reason = "no witness: if the primary is only cut off or stopped, both may run the guest (split brain)"
	case !st.queried:
		out.Reason = "failover impossible until the witness answers (not asked yet)"
	case !st.reachable:
		out.Reason = "failover impossible until the witness answers: " + st.queryErr
	case st.record.Generation != st.generation:
		out.Reason = fmt.Sprintf("failover impossible: the primary's generation %d is not current at the witness (generation %d held by %q)",
			st.generation, st.record.Generation, st.record.Holder)
	default:
		out.FailoverPossible = true
		out.Reason = fmt.Sprintf("failover possible (witness at generation %d)", st.record.Generation)
	}
	return out
}

// Describe is Status in words, as govmm ctl info shows it.
func (st StandbyStatus) Describe() string {
	s := "standby, " + st.Phase
	if st.Source != "" && st.Phase != PhaseListening {
		s += " " + st.Source
	}
	if st.Epoch > 0 && st.Phase != PhaseListening {
		s += fmt.Sprintf(", checkpoint %d", st.Epoch)
	}
	if st.Outcome != "" && st.Phase == PhaseListening {
		s += " (last source: " + st.Outcome + ")"
	}
	return s
}

// Metrics are the standby's: govmm_failover_possible,
// govmm_standby_checkpoint, govmm_standby_following,
// govmm_standby_received_bytes_total, govmm_standby_lag_seconds (while a
// source with a checkpoint is followed), the pages received
// (StreamMetrics) and, with a witness, govmm_witness_reachable and
// govmm_witness_generation.
func (sb *Standby) Metrics() []Metric {
	st := sb.Status()
	var out []Metric
	add := func(name, help string, v float64) {
		out = append(out, Metric{Name: name, Help: help, Type: "gauge", Value: v})
	}
	add("govmm_failover_possible", "1 if this standby would take over were its primary lost now", b2f(st.FailoverPossible))
	add("govmm_standby_checkpoint", "the last resumable checkpoint committed here", float64(st.Epoch))
	add("govmm_standby_following", "1 while a source's stream is open", b2f(st.Phase == PhaseReplicating || st.Phase == PhaseClaiming))
	out = append(out, Metric{Name: "govmm_standby_received_bytes_total", Help: "stream bytes received from sources",
		Type: "counter", Value: float64(st.BytesReceived)})
	if st.Lag > 0 {
		add("govmm_standby_lag_seconds", "time since the last checkpoint committed here", st.Lag.Seconds())
	}
	if st.Witness != "" {
		add("govmm_witness_reachable", "1 if the witness answered the standby's last question", b2f(st.Reachable))
		add("govmm_witness_generation", "the source's generation at the witness", float64(st.Generation))
	}
	return append(out, StreamMetrics(st.Stream, false)...)
}

func (sb *Standby) update(fn func(st *standbyState)) {
	sb.mu.Lock()
	fn(&sb.st)
	sb.mu.Unlock()
}

func (sb *Standby) setFollowing(r *stream.Receiver) {
	peer := r.Peer()
	sb.update(func(st *standbyState) {
		src := peer.Name
		if peer.Holder != "" {
			src += " (" + peer.Holder + ")"
		}
		st.phase, st.source, st.generation, st.epoch, st.outcome, st.claimErr = PhaseReplicating, src, peer.Generation, 0, "", ""
		st.peerAddr, st.recv, st.committedAt = r.RemoteAddr(), r, time.Time{}
	})
}

// detach counts what r received and forgets it: its stream has ended.
func (sb *Standby) detach(r *stream.Receiver) {
	sb.update(func(st *standbyState) {
		if st.recv == r {
			rs := r.Stats()
			st.bytesDone += rs.BytesReceived
			addReceived(&st.streamDone, rs)
			st.recv = nil
		}
	})
}

// addReceived adds the counters of rs that the standby sums over its
// sources to to.
func addReceived(to *stream.Stats, rs stream.Stats) {
	to.Pages += rs.Pages
	to.ZeroPages += rs.ZeroPages
	to.DeltaPages += rs.DeltaPages
	to.CopyPages += rs.CopyPages
	to.DiskBytes += rs.DiskBytes
	to.PollHits += rs.PollHits
	to.PollMisses += rs.PollMisses
}

func (sb *Standby) setCheckpoint(epoch uint64) {
	sb.update(func(st *standbyState) { st.epoch, st.committedAt = epoch, time.Now() })
}

func (sb *Standby) setClaiming(base uint64, claimErr string) {
	sb.update(func(st *standbyState) { st.phase, st.generation, st.claimErr = PhaseClaiming, base, claimErr })
}

func (sb *Standby) setListening(outcome string) {
	sb.update(func(st *standbyState) { st.phase, st.outcome, st.claimErr = PhaseListening, outcome, "" })
}

// setRunning: the guest runs here; the poller stops (the Fence reports
// from now on).
func (sb *Standby) setRunning(*Fence) {
	sb.update(func(st *standbyState) { st.phase = PhaseRunning })
	sb.pollCancel()
}

// poll asks the witness for the VM's record every half lease until
// stopped, so that Status can tell whether a failover would be possible.
func (sb *Standby) poll() {
	defer close(sb.pollDone)
	w := sb.cfg.Witness
	every := max(w.LeaseAsked()/2, 10*time.Millisecond)
	for {
		rec, err := w.Query(sb.pollCtx)
		if sb.pollCtx.Err() != nil {
			return
		}
		var ref *witness.Refusal
		reachable := err == nil || errors.As(err, &ref)
		sb.update(func(st *standbyState) {
			if st.queried && st.reachable != reachable {
				if reachable {
					sb.log.Info("the witness answers again: failover possible", "witness", w.Addr())
				} else {
					sb.log.Error("WITNESS UNREACHABLE: failover impossible until it answers", "witness", w.Addr(), "err", err)
				}
			} else if !st.queried && !reachable {
				sb.log.Error("WITNESS UNREACHABLE: failover impossible until it answers", "witness", w.Addr(), "err", err)
			}
			st.queried, st.reachable, st.record, st.checked = true, reachable, rec, time.Now()
			st.queryErr = ""
			if err != nil {
				st.queryErr = err.Error()
			}
		})
		select {
		case <-time.After(every):
		case <-sb.pollCtx.Done():
			return
		}
	}
}
