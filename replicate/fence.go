package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

// Fence is one VMM's side of fencing (DESIGN.md invariant 8, "exactly one
// emitter"; docs/FENCING.md): it holds the VMM's lease at the witness and
//
//   - gates every frame of the guest's output on it (OutputBuffer.SetGate
//     with CanRelease): a frame leaves only while the lease is valid by
//     this VMM's own clock;
//   - when replication ends after a standby got a resumable checkpoint
//     (the standby was lost, or replication was stopped), holds the
//     guest's output until the generation has been advanced past the one
//     that standby knows, so that the standby, which could only resume
//     from behind what clients are about to see, can never claim the VM;
//   - once the witness says another VMM holds a newer generation, fences
//     the VMM for good: its output buffers drop everything and never send
//     again, its disks refuse writes, its vCPUs stop, and Fenced is
//     closed; the machine is kept for inspection.
//
// Goroutines: one, started by NewFence and ended by Close or fencing,
// which advances the generation when asked and runs the fencing sequence.
// CanRelease and the status methods are safe from any goroutine.
type Fence struct {
	lease *witness.Lease
	addr  string
	m     pauser // nil: no machine yet
	outs  []*OutputBuffer
	disks []*DiskLog
	log   *slog.Logger
	retry time.Duration // between failed advances

	// behind: a standby left behind may hold a replica the guest has run
	// ahead of; nothing leaves until the generation has been advanced.
	behind atomic.Bool
	kick   chan struct{} // buffered: behind was set
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // the goroutine has ended
	fenced chan struct{} // closed once the fencing sequence has run

	fenceOnce sync.Once
	closeOnce sync.Once

	mu      sync.Mutex    // guards the fields below
	changed chan struct{} // closed and replaced when behind clears or the VMM is fenced
	advErr  error         // of the last failed advance, while behind
	behindT time.Time     // when behind was last set
}

// pauser is what a Fence needs of its machine (*vmm.Machine): to stop
// its vCPUs.
type pauser interface{ Pause() error }

// FenceConfig is what a Fence guards.
type FenceConfig struct {
	// Lease is the VMM's generation at the witness: acquired by a booting
	// primary (witness.Client.Acquire), claimed by a standby taking over
	// (Client.Claim). The Fence owns it from now on (Close closes it).
	Lease *witness.Lease
	// Witness is the witness's address, for messages.
	Witness string
	// Machine is stopped (its vCPUs paused for good) when fenced; nil
	// before there is one.
	Machine *vmm.Machine
	// Outputs are the guest's NICs' output buffers: each is gated on the
	// lease from now on, and fenced with the VMM.
	Outputs []*OutputBuffer
	// Disks refuse every write once fenced (wire DiskLog.AllowWrite into
	// the virtio-blk device).
	Disks  []*DiskLog
	Logger *slog.Logger

	// pauser stands in for Machine in this package's tests of how a
	// fence pauses (a pause that fails).
	pauser pauser
}

// NewFence gates cfg.Outputs on cfg.Lease and starts watching it.
func NewFence(cfg FenceConfig) *Fence {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	l := cfg.Lease.Status().Lease
	if l <= 0 {
		l = witness.DefaultLease
	}
	f := &Fence{lease: cfg.Lease, addr: cfg.Witness, outs: cfg.Outputs, disks: cfg.Disks,
		log:  cfg.Logger.With("component", "replicate", "witness", cfg.Witness),
		kick: make(chan struct{}, 1), done: make(chan struct{}), fenced: make(chan struct{}),
		changed: make(chan struct{}), retry: max(l/4, 10*time.Millisecond)}
	if cfg.Machine != nil { // a nil *vmm.Machine stays a nil pauser
		f.m = cfg.Machine
	} else if cfg.pauser != nil {
		f.m = cfg.pauser
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	for _, o := range f.outs {
		o.SetGate(f.CanRelease)
	}
	go f.run()
	return f
}

// CanRelease reports whether a frame of the guest's output may leave now:
// the lease is valid by this VMM's clock, it is not fenced, and no standby
// is left behind. It never blocks (a clock reading and a few atomics).
func (f *Fence) CanRelease() bool { return !f.behind.Load() && f.lease.CanRelease() }

// Generation is the generation this VMM holds.
func (f *Fence) Generation() uint64 { return f.lease.Generation() }

// Fenced is closed once the VMM has been fenced and the fencing sequence
// has run: outputs and disks refuse everything, the vCPUs are paused.
func (f *Fence) Fenced() <-chan struct{} { return f.fenced }

// Err is the *witness.FencedError once fenced, else nil.
func (f *Fence) Err() error {
	select {
	case <-f.fenced:
		return f.lease.Err()
	default:
		return nil
	}
}

// Close stops watching and renewing; the lease runs out at the witness by
// itself. It does not resign: a standby's claim then waits for the lease
// to run out, which a process that merely exits can afford. Idempotent.
func (f *Fence) Close() {
	f.closeOnce.Do(func() {
		f.cancel()
		<-f.done
		f.lease.Close()
	})
}

func (f *Fence) run() {
	defer close(f.done)
	for {
		select {
		case <-f.ctx.Done():
			return
		case <-f.lease.Fenced():
			f.fence()
			return
		case <-f.kick:
		}
		if !f.advance() {
			return
		}
	}
}

// standbyGone is told that replication has ended after a resumable
// checkpoint reached (or may have reached) the standby: from now on the
// guest's output would run ahead of that standby's replica, so nothing
// leaves until the generation is advanced (the standby's claim, which
// names the old generation, is then superseded for good). Call it before
// the output buffers pass output through. A nil Fence (no witness) does
// nothing.
func (f *Fence) standbyGone() {
	if f == nil {
		return
	}
	f.mu.Lock()
	f.behindT = time.Now()
	f.mu.Unlock()
	f.behind.Store(true)
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// advance moves the lease to the next generation while a standby is left
// behind, retrying until it succeeds; false means stop (fenced, closed).
func (f *Fence) advance() bool {
	logged := false
	for f.behind.Load() {
		ctx, cancel := context.WithTimeout(f.ctx, 8*f.retry)
		err := f.lease.Advance(ctx)
		cancel()
		switch {
		case err == nil:
			f.mu.Lock()
			f.advErr = nil
			f.behind.Store(false)
			close(f.changed)
			f.changed = make(chan struct{})
			f.mu.Unlock()
			f.log.Warn("witness generation advanced: the guest runs UNPROTECTED at it (a new standby can protect it)",
				"generation", f.lease.Generation())
			return true
		case errors.Is(err, witness.ErrFenced):
			f.fence()
			return false
		case f.ctx.Err() != nil:
			return false
		}
		f.mu.Lock()
		f.advErr = err
		f.mu.Unlock()
		if !logged {
			logged = true
			f.log.Error("STANDBY GONE, WITNESS NOT ANSWERING: the guest's output is HELD until the generation is advanced",
				"generation", f.lease.Generation(), "err", err)
		}
		select {
		case <-time.After(f.retry):
		case <-f.ctx.Done():
			return false
		case <-f.lease.Fenced():
			f.fence()
			return false
		}
	}
	return true
}

// fence runs the fencing sequence once: output first (the lease already
// says no, and Fence waits for a frame in flight), then the disks, then
// the vCPUs. The stream is left to its owner, which watches Fenced.
func (f *Fence) fence() {
	f.fenceOnce.Do(func() {
		f.log.Error("FENCED: another VMM holds a newer generation of this VM; this one stops its guest and never releases output or writes its disk again",
			"err", f.lease.Err())
		for _, o := range f.outs {
			o.Fence()
		}
		for _, d := range f.disks {
			d.Fence()
		}
		if f.m != nil {
			f.pause()
		}
		f.mu.Lock()
		close(f.changed)
		f.changed = make(chan struct{})
		f.mu.Unlock()
		close(f.fenced)
	})
}

// fencePauseTries and fencePauseRetry bound how long a fence tries to
// pause a machine whose pause fails: a second at most, then it gives up
// with the output and disks fenced already.
const (
	fencePauseTries = 100
	fencePauseRetry = 10 * time.Millisecond
)

// pause stops the guest's vCPUs for good. A pause can fail without the
// machine stopping (a vCPU's KVM_RUN failing on its way out of the guest
// leaves that vCPU running); a fenced VMM promises a stopped guest, so it
// tries again, each failure logged, until the pause holds, the machine
// has stopped (a stopped guest runs no more either) or fencePauseTries
// have failed.
func (f *Fence) pause() {
	for i := 1; ; i++ {
		err := f.m.Pause()
		if err == nil {
			return
		}
		if errors.Is(err, vmm.ErrStopped) {
			f.log.Info("fenced: the machine had stopped already", "err", err)
			return
		}
		if i == fencePauseTries {
			f.log.Error("fenced: the vCPUs could not be paused; the guest runs on, its output and disks fenced", "tries", i, "err", err)
			return
		}
		f.log.Warn("fenced: pause the vCPUs; trying again", "try", i, "err", err)
		time.Sleep(fencePauseRetry)
	}
}

// settle waits until no standby is left behind: a new replication's hello
// must carry the generation its standby will claim from, not one about to
// be advanced.
func (f *Fence) settle(ctx context.Context) error {
	for {
		f.mu.Lock()
		ch, last := f.changed, f.advErr
		f.mu.Unlock()
		if err := f.lease.Err(); err != nil {
			return err
		}
		if !f.behind.Load() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("witness %s: the generation a previous standby knows is not advanced yet (%w); last error: %v",
				f.addr, ctx.Err(), last)
		}
	}
}

// identity adds the lease's generation and holder name to id (the
// hello's).
func (f *Fence) identity(id stream.Identity) stream.Identity {
	if f != nil {
		id.Generation, id.Holder = f.lease.Generation(), f.lease.Holder()
	}
	return id
}

// resign ends the lease at the witness (the source of a migration, after
// the final ack): the destination's claim need not wait for it to run
// out. The output is fenced by the handover already.
func (f *Fence) resign(ctx context.Context) error {
	if f == nil {
		return nil
	}
	return f.lease.Resign(ctx)
}

// FenceStatus is a snapshot of a Fence, for ctl info and metrics.
type FenceStatus struct {
	Witness string
	Lease   witness.LeaseStatus
	// Behind: a standby was left behind and the generation is not advanced
	// yet (output held); AdvanceErr says why, Since since when.
	Behind     bool
	AdvanceErr string
	Since      time.Time
	Fenced     error
	Output     BufferStats // summed over the outputs
}

// Status snapshots the Fence.
func (f *Fence) Status() FenceStatus {
	st := FenceStatus{Witness: f.addr, Lease: f.lease.Status(), Behind: f.behind.Load(), Fenced: f.Err()}
	f.mu.Lock()
	if f.advErr != nil {
		st.AdvanceErr = f.advErr.Error()
	}
	st.Since = f.behindT
	f.mu.Unlock()
	for _, o := range f.outs {
		s := o.Stats()
		st.Output.HeldNoLease += s.HeldNoLease
		st.Output.DroppedNoLease += s.DroppedNoLease
		st.Output.DroppedFenced += s.DroppedFenced
	}
	return st
}

// Describe is the Fence's state in words, for ctl info.
func (f *Fence) Describe() string {
	st := f.Status()
	l := st.Lease
	var fe *witness.FencedError
	switch {
	case errors.As(st.Fenced, &fe):
		return fmt.Sprintf("FENCED: generation %d of %s is held by %q; this VMM held generation %d and never releases output or writes its disk again",
			fe.Current, fe.VM, fe.Holder, fe.Generation)
	case st.Fenced != nil:
		return "FENCED: " + st.Fenced.Error()
	case st.Behind:
		s := fmt.Sprintf("witness %s: standby gone, advancing past generation %d: output HELD", st.Witness, l.Generation)
		if st.AdvanceErr != "" {
			s += " (witness not answering: " + st.AdvanceErr + ")"
		}
		return s
	case l.Valid:
		return fmt.Sprintf("witness %s: generation %d, lease valid (%v left)", st.Witness, l.Generation, l.Remaining.Round(time.Millisecond))
	}
	s := fmt.Sprintf("witness %s: generation %d, lease EXPIRED: output HELD until the witness answers", st.Witness, l.Generation)
	if l.LastError != "" {
		s += " (" + l.LastError + ")"
	}
	return s
}

// Metrics are the Fence's gauges and counters, named govmm_witness_* and
// govmm_output_*_without_lease_total.
func (f *Fence) Metrics() []Metric {
	st := f.Status()
	l := st.Lease
	var out []Metric
	add := func(name, help, typ string, v float64) {
		out = append(out, Metric{Name: name, Help: help, Type: typ, Value: v})
	}
	add("govmm_witness_generation", "the generation of the VM this VMM holds at the witness", "gauge", float64(l.Generation))
	add("govmm_witness_lease_valid", "1 while the witness lease lets output out; 0 means output is held", "gauge", b2f(l.Valid && !st.Behind))
	add("govmm_witness_lease_remaining_seconds", "time left of the lease's validity by this VMM's clock", "gauge", l.Remaining.Seconds())
	add("govmm_witness_renewals_total", "lease renewals the witness answered", "counter", float64(l.Renewals))
	add("govmm_witness_renewal_failures_total", "lease renewals that failed", "counter", float64(l.TotalFails))
	add("govmm_witness_renewal_rtt_seconds", "round trip of the last answered renewal", "gauge", l.LastRTT.Seconds())
	add("govmm_witness_fenced", "1 once this VMM is fenced: another holds a newer generation; it never releases output again", "gauge", b2f(st.Fenced != nil))
	add("govmm_witness_standby_behind", "1 while a standby was left behind and the generation is not advanced yet (output held)", "gauge", b2f(st.Behind))
	add("govmm_output_held_without_lease_total", "releases of acknowledged output postponed for lack of a valid lease", "counter", float64(st.Output.HeldNoLease))
	add("govmm_output_dropped_without_lease_total", "unreplicated output frames dropped for lack of a valid lease", "counter", float64(st.Output.DroppedNoLease))
	add("govmm_output_dropped_fenced_total", "output frames dropped because this VMM is fenced", "counter", float64(st.Output.DroppedFenced))
	return out
}
