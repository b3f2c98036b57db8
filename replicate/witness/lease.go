package witness

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// Lease timing (docs/FENCING.md, "Lease timing").
const (
	// DefaultLease is the lease a client asks for when its Config says
	// nothing. A dead primary's lease runs out at most this long after its
	// last renewal, so it bounds the failover time from above, together
	// with the standby's own failure detection.
	DefaultLease = 2 * time.Second
	// MinLease is the shortest lease a witness grants.
	MinLease = 10 * time.Millisecond
	// DefaultMaxLease is the longest lease a witness grants unless told.
	DefaultMaxLease = time.Minute
	// maxLeaseCap bounds any lease on the wire or in the state file.
	maxLeaseCap = 10 * time.Minute
	// MaxDrift bounds how far the rate of any party's lease clock may be
	// from real time, as a fraction (1e-3 = 1000 ppm): NTP slews
	// CLOCK_BOOTTIME by at most 500 ppm, and a crystal is off by well
	// under 100 ppm.
	MaxDrift = 1e-3
)

// CheckLease says why d cannot be a lease, or nil: the one check of a
// lease a VMM asks for (--witness-lease) and of a witness's longest
// (--max-lease).
func CheckLease(d time.Duration) error {
	if d < MinLease || d > maxLeaseCap {
		return fmt.Errorf("want %v to %v", MinLease, maxLeaseCap)
	}
	return nil
}

// usable is how long after sending a request the holder may release
// output when the witness answers with lease l: the witness counts l from
// when the request reached it, which is after it was sent; with clock
// rates within MaxDrift of real time, l×(1-ρ)/(1+ρ) of the holder's clock
// is shorter than l of the witness's; margin is taken off on top (time for
// a release in progress to finish, and slack).
func usable(l, margin time.Duration) time.Duration {
	return time.Duration(float64(l)*(1-MaxDrift)/(1+MaxDrift)) - margin
}

// defaultMargin is Config.Margin's default: a tenth of the lease.
func defaultMargin(l time.Duration) time.Duration { return l / 10 }

// leaseCore is a holder's view of its lease: pure state, no I/O, shared
// by Lease and the simulation test. Every field is atomic so that
// canRelease never takes a lock.
type leaseCore struct {
	vm, holder string
	gen        atomic.Uint64
	lease      atomic.Int64 // granted lease (ns)
	validUntil atomic.Int64 // lease clock (ns): release only while now < validUntil
	fenced     atomic.Pointer[FencedError]
	ended      atomic.Bool // resigned: never valid again
}

func newLeaseCore(vm, holder string, gen uint64) *leaseCore {
	c := &leaseCore{vm: vm, holder: holder}
	c.gen.Store(gen)
	return c
}

// extendTo moves the validity forward to until (never back).
func (c *leaseCore) extendTo(until time.Duration) {
	for {
		cur := c.validUntil.Load()
		if int64(until) <= cur || c.validUntil.CompareAndSwap(cur, int64(until)) {
			return
		}
	}
}

// grant records a grant or renewal answered to a request sent at sentAt.
func (c *leaseCore) grant(sentAt, lease, margin time.Duration) {
	c.lease.Store(int64(lease))
	c.extendTo(sentAt + usable(lease, margin))
}

func (c *leaseCore) canRelease(now time.Duration) bool {
	return c.fenced.Load() == nil && !c.ended.Load() && now < time.Duration(c.validUntil.Load())
}

// fence makes the lease invalid for good; it reports whether this call
// fenced it (the first one).
func (c *leaseCore) fence(e *FencedError) bool {
	return c.fenced.CompareAndSwap(nil, e)
}

// verdict classifies a reply to one of the holder's own requests.
type verdict int

const (
	verdictNone    verdict = iota // nothing learned (refused, unknown, error)
	verdictGranted                // the witness granted or renewed: extend
	verdictFenced                 // another VMM holds a generation at least ours
)

// judge reads a reply to a renew, advance or resign sent by holder while
// it held generation gen. Only the witness's word that someone else holds
// the current generation fences; a record without us ("unknown": the
// witness lost or rolled back its state) is not a fence, but not a
// renewal either, so the lease runs out.
func judge(holder string, gen uint64, rep *reply) verdict {
	switch rep.result {
	case resultOK:
		if rep.holder == holder && rep.gen >= gen {
			return verdictGranted
		}
		if rep.holder != holder && rep.gen >= gen {
			return verdictFenced
		}
	case resultSuperseded:
		if rep.holder != holder && rep.gen >= gen {
			return verdictFenced
		}
	}
	return verdictNone
}

// Lease is a generation held at the witness, kept alive by a renewal
// goroutine. The primary's output-release path asks CanRelease, which
// reads three atomics and the clock: it never blocks and never touches
// the network.
//
// Goroutines: one renewal goroutine per Lease, started by Acquire or
// Claim, stopped by Close, Resign or fencing; it owns no state the release
// path reads except through leaseCore's atomics.
type Lease struct {
	c      *Client
	core   *leaseCore
	log    *slog.Logger
	ctx    context.Context // canceled by Close: ends a request in flight
	cancel context.CancelFunc
	done   chan struct{}
	fenceC chan struct{}

	closeOnce sync.Once

	mu       sync.Mutex // guards the fields below
	st       LeaseStatus
	expiredW bool // the expiry has been logged
}

// LeaseStatus is a snapshot of a lease, for ctl info and metrics.
type LeaseStatus struct {
	VM, Holder string
	Generation uint64
	Lease      time.Duration // granted
	Valid      bool          // CanRelease at the time of the snapshot
	Remaining  time.Duration // of the holder's validity (0 when not Valid)
	Renewals   uint64        // answered renewals
	Failures   uint64        // renewals that failed since the last success
	TotalFails uint64
	LastRTT    time.Duration // of the last answered renewal
	LastError  string        // of the last failed one
	Fenced     *FencedError
	Resigned   bool
}

func newLease(c *Client, core *leaseCore, sentAt time.Duration) *Lease {
	ctx, cancel := context.WithCancel(context.Background())
	l := &Lease{c: c, core: core, ctx: ctx, cancel: cancel, done: make(chan struct{}), fenceC: make(chan struct{}),
		log: c.log.With("vm", core.vm, "holder", core.holder)}
	go l.run(sentAt)
	return l
}

// Generation is the generation held (it changes only through Advance).
func (l *Lease) Generation() uint64 { return l.core.gen.Load() }

// Holder is this VMM's name at the witness.
func (l *Lease) Holder() string { return l.core.holder }

// CanRelease reports whether output may be released now: the lease is
// neither fenced nor resigned and the holder's own clock says it is still
// valid. It is cheap (a clock reading and three atomic loads), never
// blocks, and is safe from any goroutine. Check it immediately before
// every release: a true answer holds until the validity ends, at least
// Margin before any other VMM can be granted a generation.
func (l *Lease) CanRelease() bool { return l.core.canRelease(l.c.clk.Now()) }

// ValidUntil is the lease clock reading (Config.Clock) at which the
// validity ends if no renewal succeeds before; 0 when fenced or resigned.
func (l *Lease) ValidUntil() time.Duration {
	if l.core.fenced.Load() != nil || l.core.ended.Load() {
		return 0
	}
	return time.Duration(l.core.validUntil.Load())
}

// Remaining is how long CanRelease stays true without another renewal
// (0 if it is false now).
func (l *Lease) Remaining() time.Duration {
	return max(l.ValidUntil()-l.c.clk.Now(), 0)
}

// Fenced is closed when the lease is fenced: the witness has granted a
// higher generation to another VMM. From then on CanRelease is false for
// good; Err says who won.
func (l *Lease) Fenced() <-chan struct{} { return l.fenceC }

// Err is the *FencedError once fenced, else nil.
func (l *Lease) Err() error {
	if e := l.core.fenced.Load(); e != nil {
		return e
	}
	return nil
}

// Status snapshots the lease for ctl info and metrics.
func (l *Lease) Status() LeaseStatus {
	l.mu.Lock()
	st := l.st
	l.mu.Unlock()
	st.VM, st.Holder, st.Generation = l.core.vm, l.core.holder, l.core.gen.Load()
	st.Lease = time.Duration(l.core.lease.Load())
	now := l.c.clk.Now()
	st.Valid = l.core.canRelease(now)
	if st.Valid {
		st.Remaining = time.Duration(l.core.validUntil.Load()) - now
	}
	st.Fenced = l.core.fenced.Load()
	st.Resigned = l.core.ended.Load()
	return st
}

func (l *Lease) interval() time.Duration { return time.Duration(l.core.lease.Load()) / 4 }

func (l *Lease) margin() time.Duration {
	lease := time.Duration(l.core.lease.Load())
	if l.c.cfg.Margin > 0 {
		return min(l.c.cfg.Margin, lease/2)
	}
	return defaultMargin(lease)
}

// run renews the lease every quarter lease, timed from the send of the
// previous successful request; after a failure it tries again after an
// eighth. It stops when fenced or closed.
func (l *Lease) run(sentAt time.Duration) {
	defer close(l.done)
	clk := l.c.clk
	next := sentAt + l.interval()
	for {
		if !sleep(clk, next-clk.Now(), l.ctx.Done()) {
			return
		}
		gen := l.core.gen.Load()
		sent, rep, err := l.c.do(l.ctx, &request{op: opRenew, gen: gen, vm: l.core.vm, holder: l.core.holder})
		if l.ctx.Err() != nil {
			return
		}
		now := clk.Now()
		if err == nil {
			switch judge(l.core.holder, gen, &rep) {
			case verdictGranted:
				l.core.grant(sent, rep.lease, l.margin())
				l.renewed(now - sent)
				next = sent + l.interval()
				continue
			case verdictFenced:
				l.fence(gen, &rep)
				return
			}
			err = l.c.refusal("renew", &rep)
		}
		l.failed(err, now)
		next = now + l.interval()/2
	}
}

func (l *Lease) renewed(rtt time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.st.Failures > 0 {
		l.log.Info("witness lease renewed again", "generation", l.core.gen.Load(), "failures", l.st.Failures)
	}
	l.st.Renewals++
	l.st.Failures = 0
	l.st.LastRTT = rtt
	l.expiredW = false
}

func (l *Lease) failed(err error, now time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.st.Failures++
	l.st.TotalFails++
	l.st.LastError = err.Error()
	if l.st.Failures == 1 {
		l.log.Warn("witness lease renewal failed", "generation", l.core.gen.Load(), "err", err)
	}
	if !l.core.canRelease(now) && !l.expiredW {
		l.expiredW = true
		l.log.Error("WITNESS LEASE EXPIRED: no output may be released until the witness answers", "generation", l.core.gen.Load(), "err", err)
	}
}

func (l *Lease) fence(gen uint64, rep *reply) *FencedError {
	fe := &FencedError{VM: l.core.vm, Generation: gen, Current: rep.gen, Holder: rep.holder}
	if l.core.fence(fe) {
		l.c.fenced.Store(true)
		l.log.Error("FENCED: another VMM holds a newer generation; never releasing output again", "generation", gen, "current", rep.gen, "current_holder", rep.holder)
		close(l.fenceC)
	}
	return l.core.fenced.Load()
}

// Advance moves the lease to the next generation, which the witness
// grants only to the holder of the current one. A primary calls it before
// it lets output out that its standby has not acknowledged (when it goes
// on unprotected after losing the standby): the standby, which could only
// resume from an older checkpoint, can then never claim the VM. It
// retries through network errors until ctx ends. If another VMM won the
// next generation first, the lease is fenced and Advance returns the
// *FencedError.
func (l *Lease) Advance(ctx context.Context) error {
	if err := l.Err(); err != nil {
		return err
	}
	if l.core.ended.Load() {
		return fmt.Errorf("witness %s: advance %s: lease resigned", l.c.cfg.Addr, l.core.vm)
	}
	gen := l.core.gen.Load()
	q := request{op: opAcquire, base: true, gen: gen, vm: l.core.vm, holder: l.core.holder, lease: l.c.cfg.Lease}
	for {
		sent, rep, err := l.c.do(ctx, &q)
		if err == nil {
			switch {
			case rep.result == resultOK && rep.holder == l.core.holder && rep.gen == gen+1:
				l.core.gen.Store(rep.gen)
				l.core.grant(sent, rep.lease, l.margin())
				l.log.Info("witness generation advanced", "generation", rep.gen)
				return nil
			case judge(l.core.holder, gen, &rep) == verdictFenced:
				return l.fence(gen, &rep)
			case rep.result != resultError:
				return l.c.refusal("advance", &rep)
			}
			err = l.c.refusal("advance", &rep)
		}
		if !sleep(l.c.clk, l.c.retryEvery(), ctx.Done()) {
			return fmt.Errorf("witness %s: advance %s: %w (last: %w)", l.c.cfg.Addr, l.core.vm, ctx.Err(), err)
		}
	}
}

// Resign ends the lease: CanRelease is false from the call on, renewals
// stop, and the witness is told so that a successor's claim need not wait
// for the lease to run out (a planned handover). If the witness cannot be
// told before ctx ends, the lease runs out there by itself; the error says
// so.
func (l *Lease) Resign(ctx context.Context) error {
	l.core.ended.Store(true)
	l.Close()
	if l.Err() != nil {
		return nil
	}
	q := request{op: opResign, gen: l.core.gen.Load(), vm: l.core.vm, holder: l.core.holder}
	for {
		_, rep, err := l.c.do(ctx, &q)
		if err == nil {
			if rep.result == resultOK {
				l.log.Info("witness lease resigned", "generation", q.gen)
				return nil
			}
			if rep.result != resultError {
				return l.c.refusal("resign", &rep)
			}
			err = l.c.refusal("resign", &rep)
		}
		if !sleep(l.c.clk, l.c.retryEvery(), ctx.Done()) {
			return fmt.Errorf("witness %s: resign %s: %w; the lease runs out there by itself (last: %w)", l.c.cfg.Addr, l.core.vm, ctx.Err(), err)
		}
	}
}

// Close stops renewing and waits for the renewal goroutine. CanRelease
// keeps telling the truth: true until the validity runs out. Idempotent.
func (l *Lease) Close() {
	l.closeOnce.Do(func() {
		l.cancel()
		<-l.done
	})
}
