package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// testHooks are seams for this package's tests; production code passes
// none.
type testHooks struct {
	// atCut runs at every checkpoint's cut while the guest is paused
	// (tests compare the standby's memory or disk with the primary's).
	atCut func(epoch uint64)
	// inPause runs first in every checkpoint's pause, the function it
	// returns last, whatever the pause's outcome (tests whose own writers
	// stand for a device hold them off as a quiesced device is).
	inPause func() (done func())
	// atCutCopy runs right after atCut, told whether the checkpoint
	// copies on write (tests that want a cut of one kind).
	atCutCopy func(epoch uint64, cow bool)
	// preHarvest runs just before the pre-harvest of the checkpoint of
	// epoch, beforePause after it (its set, nil without) and the arming,
	// just before the pause; the guest runs (tests write pages before and
	// after the pre-harvest, and compare the standby's memory at the cut).
	preHarvest  func(epoch uint64)
	beforePause func(epoch uint64, pre *dirtylog.Set)
}

// Replicator keeps a standby in step with a running machine.
//
// Goroutines: the epoch loop (checkpoints) and the ack loop (releases
// output as acks arrive); Stop ends both and waits for them. Lock order:
// mu, then nothing.
type Replicator struct {
	m      *vmm.Machine
	cfg    ReplicateConfig
	hooks  testHooks
	t      Transport
	tr     *dirtylog.Tracker
	log    *slog.Logger
	ctx    context.Context // cancelled by Stop
	cancel context.CancelFunc
	stop   chan struct{}
	done   chan struct{}
	acks   chan struct{} // closed when the ack loop has ended

	stopOnce sync.Once
	endOnce  sync.Once // endOutputCommit
	// resumable: a resumable checkpoint has been sent, so the standby may
	// hold a replica it could resume (and claim from).
	resumable atomic.Bool

	mu           sync.Mutex // guards the fields below
	err          error      // why replication ended (nil while running)
	protected    bool
	policyPaused bool // the pause policy holds a pause on m
	epoch        uint64
	recent       []EpochStats // ring of the last epochs, for metrics
	totals       totals
	resumedAt    map[uint64]time.Time
	lastResumed  time.Time
	// target is the length of the epoch running now (cfg.Epoch, or with
	// adaptive epochs between it and cfg.MaxEpoch); the loop sets it.
	target time.Duration

	// Staging buffer, owned by the epoch loop: the dirty pages and disk
	// writes of the checkpoint being streamed, kept across epochs; where
	// guestmem.PageSumFast(), sums holds each staged page's PageSum, which
	// its copy took (the snapshot's, copying on write).
	gpas    []guestmem.GPA
	staging []byte
	sums    []guestmem.PageSum
	writes  [][]DiskWrite
	// cow write-protects the dirty pages for copy-on-write checkpoints;
	// nil when they all stop to copy.
	cow *guestmem.Protector
	// lastCoW: the last checkpoint copied on write, so its pages are
	// what the next one's arming predicts (beforePause).
	lastCoW bool
}

// ErrStandbyLost is why replication ends when the standby stops answering.
var ErrStandbyLost = errors.New("standby lost: the guest runs unprotected")

// StartReplication connects to the standby, copies the guest's disks and
// memory while it runs (pre-copy), then takes the first complete
// checkpoint and starts the epoch loop. From then on every network frame
// waits for its epoch's ack. It returns once the guest is protected; on
// failure nothing is left armed: output flows as before.
func StartReplication(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig) (*Replicator, error) {
	return startReplication(ctx, m, cfg, testHooks{})
}

func startReplication(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig, hooks testHooks) (*Replicator, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	peer := cfg.To
	if cfg.Transport != nil {
		peer = fmt.Sprintf("%T", cfg.Transport)
	}
	r := &Replicator{m: m, cfg: cfg, hooks: hooks, log: cfg.Logger.With("component", "replicate", "standby", peer),
		stop: make(chan struct{}), done: make(chan struct{}), acks: make(chan struct{}), resumedAt: map[uint64]time.Time{},
		target: cfg.Epoch}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	if cfg.Fence != nil {
		// The standby will claim from the generation in the hello: the one
		// a previous standby knows must be advanced past first.
		if err := cfg.Fence.settle(ctx); err != nil {
			r.cancel()
			return nil, fmt.Errorf("replicate: %w", err)
		}
	}
	r.t = cfg.Transport
	if r.t == nil {
		s, err := stream.Dial(ctx, cfg.To, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure,
			Identity: cfg.Fence.identity(IdentityOf(m, cfg.Name, cfg.Devices)), HeartbeatInterval: cfg.FailoverTimeout / 4,
			FailoverTimeout: cfg.FailoverTimeout, Compression: cfg.Compression, Deltas: cfg.Deltas, Cipher: cfg.Cipher, AckSpin: cfg.AckSpin, SendBuffer: cfg.SendBuffer, Logger: cfg.Logger})
		if err != nil {
			r.cancel()
			return nil, fmt.Errorf("replicate to %s: %w", cfg.To, err)
		}
		r.t = s
	}
	if r.tr, err = trackDirty(m); err != nil {
		_ = r.t.Close()
		r.cancel()
		return nil, fmt.Errorf("replicate: %w", err)
	}
	if r.cow, err = r.copyOnWrite(); err != nil {
		r.tr.Close()
		_ = r.t.Close()
		r.cancel()
		return nil, fmt.Errorf("replicate: %w", err)
	}
	go r.ackLoop()
	// From now on every disk write is recorded, and reaches the standby
	// after the copy of the blocks it touches.
	for _, d := range cfg.Disks {
		d.Arm()
	}
	if err := r.initialSync(ctx); err != nil {
		for _, d := range cfg.Disks {
			d.Disarm()
		}
		// The first checkpoint may have armed the output buffers: what they
		// hold was never acknowledged, and nothing will release it.
		r.endOutputCommit()
		r.tr.Close()
		r.closeCoW()
		_ = r.t.Close()
		<-r.acks
		r.cancel()
		return nil, fmt.Errorf("replicate: initial sync: %w", err)
	}
	go r.loop()
	return r, nil
}

// initialSync copies the disks and the guest's memory while it runs, then
// takes the first checkpoint (the remaining dirty set and the state), and
// waits for its ack: only then is the guest protected.
func (r *Replicator) initialSync(ctx context.Context) error {
	p := precopy{t: r.t, mem: r.m.Memory(), tr: r.tr, disks: r.cfg.Disks, nextEpoch: r.nextEpoch,
		stopPages: 256, maxRounds: r.cfg.InitialRounds}
	progress := func(SyncProgress) {}
	if r.cfg.Progress != nil {
		progress = r.cfg.Progress
	}
	total := r.m.Memory().Size()
	for _, d := range r.cfg.Disks {
		total += uint64(d.Size())
	}
	p.onCopied = func(round int, copied uint64) {
		progress(SyncProgress{Round: round, Copied: copied, Total: total})
	}
	pre, err := p.run(ctx)
	if err != nil {
		return err
	}
	// The first resumable checkpoint: output buffering starts at its cut.
	if err := r.checkpoint(pre.Dirty); err != nil {
		return err
	}
	progress(SyncProgress{Round: pre.Rounds, Copied: pre.DiskBytes + pre.PagesSent*guestmem.PageSize, Total: total, Acking: true})
	// However slow the standby is with the copy, it is alive as long as
	// the stream is: the wait is bounded by the stream's own detection and
	// by the caller's ctx.
	if err := r.t.WaitAck(ctx, r.currentEpoch()); err != nil {
		return fmt.Errorf("first checkpoint not acknowledged: %w", err)
	}
	r.mu.Lock()
	r.protected = true
	r.mu.Unlock()
	r.log.Info("guest protected", "epoch", r.currentEpoch(), "disk_bytes_copied", pre.DiskBytes, "disk_holes_unread", pre.DiskHoles)
	return nil
}

// nextEpoch numbers the next checkpoint.
func (r *Replicator) nextEpoch() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.epoch++
	return r.epoch
}

func (r *Replicator) currentEpoch() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.epoch
}

func (r *Replicator) isProtected() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.protected
}

// ackLoop follows the standby's acks until the transport ends, releasing
// the output of each acknowledged epoch. It runs on its own goroutine so
// that sending output never delays the transport's reading of the wire
// (nor, with it, the failure detector).
func (r *Replicator) ackLoop() {
	defer close(r.acks)
	var acked uint64
	for {
		if err := r.t.WaitAck(context.Background(), acked+1); err != nil {
			return
		}
		acked = r.t.Acked()
		r.onAck(acked)
	}
}

// onAck releases the output of every epoch up to epoch.
func (r *Replicator) onAck(epoch uint64) {
	select {
	case <-r.stop:
		return // Stop drops what is held; nothing more leaves from here
	default:
	}
	for _, o := range r.cfg.Outputs {
		// Output the lease holds back waits for the next ack (the lease
		// logs its expiry itself); a fenced VMM sends nothing.
		if err := o.Release(epoch); err != nil && !errors.Is(err, ErrNoLease) && !errors.Is(err, ErrOutputFenced) {
			r.log.Warn("release output", "epoch", epoch, "err", err)
		}
	}
	r.mu.Lock()
	if t, ok := r.resumedAt[epoch]; ok {
		for i := len(r.recent) - 1; i >= 0; i-- {
			if r.recent[i].Epoch == epoch {
				r.recent[i].AckTime = time.Since(t)
				r.totals.Ack.Observe(r.recent[i].AckTime)
				break
			}
		}
		for e := range r.resumedAt {
			if e <= epoch {
				delete(r.resumedAt, e)
			}
		}
	}
	r.totals.Acked = epoch
	r.mu.Unlock()
}

// loop takes a checkpoint every epoch (sooner under disk pressure, later
// while too many are unacknowledged) until stopped or the standby is lost.
// With adaptive epochs it sets each epoch's length from what the last
// checkpoint cost (nextEpoch).
func (r *Replicator) loop() {
	defer close(r.done)
	t := time.NewTimer(r.cfg.Epoch)
	defer t.Stop()
	var fenced <-chan struct{} // nil without a witness: never ready
	if r.cfg.Fence != nil {
		fenced = r.cfg.Fence.Fenced()
	}
	pressure := make(chan struct{}, 1)
	for _, d := range r.cfg.Disks {
		go func(c <-chan struct{}) {
			for {
				select {
				case <-c:
					select {
					case pressure <- struct{}{}:
					default:
					}
				case <-r.ctx.Done():
					return
				}
			}
		}(d.Pressure())
	}
	for {
		select {
		case <-r.stop:
			r.finish(nil)
			return
		case <-r.t.Done():
			// Stop closes the transport too: not a loss then.
			r.ended(r.t.Err())
			return
		case <-fenced:
			// The Fence has stopped the guest, its output and its disks;
			// the standby is told goodbye: its replica descends from a
			// generation that is not current any more.
			err := r.cfg.Fence.Err()
			r.log.Error("replication ended: this VMM is fenced", "err", err)
			r.finish(err)
			return
		case <-t.C:
		case <-pressure:
			r.mu.Lock()
			r.totals.EarlyEpochs++
			r.mu.Unlock()
		}
		waited, err := r.backpressure()
		if err != nil {
			r.ended(err)
			return
		}
		if err := r.checkpoint(nil); err != nil {
			r.ended(err)
			return
		}
		// The guest runs one epoch from its resume; streaming overlaps it.
		length := r.adapt(waited)
		r.mu.Lock()
		next := length - time.Since(r.lastResumed)
		r.mu.Unlock()
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		t.Reset(max(next, 0))
	}
}

// ended handles an error of the epoch loop: Stop's doing, or a loss.
func (r *Replicator) ended(err error) {
	select {
	case <-r.stop:
		r.finish(nil)
	default:
		r.lost(err)
	}
}

// backpressure waits while MaxUnacked checkpoints are unacknowledged: a
// standby that is slow, not dead, stretches the guest's epoch (the guest
// runs on meanwhile; its output waits, as it would anyway). It reports
// whether it waited.
func (r *Replicator) backpressure() (bool, error) {
	epoch := r.currentEpoch()
	if epoch < uint64(r.cfg.MaxUnacked) || r.t.Acked()+uint64(r.cfg.MaxUnacked) > epoch {
		return false, nil
	}
	start := time.Now()
	r.mu.Lock()
	r.totals.Backpressured++
	r.mu.Unlock()
	err := r.t.WaitAck(r.ctx, epoch+1-uint64(r.cfg.MaxUnacked))
	r.mu.Lock()
	r.totals.BackpressureSum += time.Since(start)
	r.mu.Unlock()
	return true, err
}

// lost handles the standby going away: the guest is unprotected now.
// Nothing it holds of unacknowledged epochs is ever released.
func (r *Replicator) lost(cause error) {
	err := fmt.Errorf("%w: %v", ErrStandbyLost, cause)
	r.log.Error("STANDBY LOST: guest is UNPROTECTED", "err", cause, "policy", r.cfg.OnStandbyLoss)
	if r.cfg.OnStandbyLoss == OnStandbyLossPause {
		// Stop the guest until an operator decides (Stop resumes it); its
		// held output stays held meanwhile.
		if perr := r.m.Pause(); perr == nil {
			r.mu.Lock()
			r.policyPaused = true
			r.mu.Unlock()
		}
	} else {
		r.endOutputCommit()
	}
	r.finish(err)
}

// endOutputCommit ends output commit, once: what the standby acknowledged
// leaves (if the lease lets it: a release the lease held back), the rest
// is dropped, and the guest's output passes through from then on. With a
// witness, once the standby may hold a resumable replica, the Fence holds
// that output until the generation is advanced past the standby's, which
// is told before anything passes through.
func (r *Replicator) endOutputCommit() {
	r.endOnce.Do(func() {
		if acked := r.t.Acked(); acked > 0 {
			for _, o := range r.cfg.Outputs {
				_ = o.Release(acked) // not armed, fenced, no lease: nothing leaves
			}
		}
		if r.resumable.Load() {
			r.cfg.Fence.standbyGone()
		}
		for _, o := range r.cfg.Outputs {
			o.Abandon()
		}
	})
}

func (r *Replicator) finish(err error) {
	for _, d := range r.cfg.Disks {
		d.Disarm()
	}
	r.mu.Lock()
	r.err = err
	r.protected = false
	r.mu.Unlock()
	_ = r.tr.Close()
	r.closeCoW()
	_ = r.t.Close()
	<-r.acks
	r.cancel()
}

// Stop ends replication deliberately: the standby is told goodbye (also
// in the middle of a checkpoint) and discards its replica, and output the
// standby has not acknowledged is dropped, never sent (TCP retransmits).
// The guest runs on unprotected; if the pause policy had stopped it, Stop
// is the operator's decision and resumes it. Stop does not wait for a
// standby that stopped answering. Idempotent.
func (r *Replicator) Stop() {
	r.stopOnce.Do(func() {
		close(r.stop)
		r.cancel()
		// Unblocks a checkpoint stuck writing to a stalled standby.
		_ = r.t.Close()
	})
	<-r.done
	r.endOutputCommit()
	r.mu.Lock()
	paused := r.policyPaused
	r.policyPaused = false
	r.mu.Unlock()
	if paused {
		if err := r.m.Resume(); err != nil {
			r.log.Warn("resume after the pause policy", "err", err)
		}
	}
}

// Done is closed when replication has ended.
func (r *Replicator) Done() <-chan struct{} { return r.done }

// Err says why replication ended (nil while running or after Stop).
func (r *Replicator) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}
