package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// Policies when the standby is lost.
const (
	OnStandbyLossContinue = "continue" // keep running, unprotected, and say so
	OnStandbyLossPause    = "pause"    // stop the guest until an operator decides
)

// ReplicateConfig parameterises continuous replication to a standby.
type ReplicateConfig struct {
	// To is the standby's HOST:PORT, dialled with Key (or Insecure), unless
	// Transport is set.
	To string
	// Transport, if set, replaces the connection to To: NewNullTransport
	// (benchmarks) ships checkpoints nowhere.
	Transport Transport
	Name      string
	Key       []byte
	Insecure  bool
	// Epoch is the time the guest runs between checkpoints (default 25ms).
	Epoch time.Duration
	// FailoverTimeout: without any frame from the standby for this long,
	// it is declared lost (default 500ms).
	FailoverTimeout time.Duration
	// OnStandbyLoss is OnStandbyLossContinue (default) or OnStandbyLossPause.
	OnStandbyLoss string
	// Outputs are the network output buffers whose frames wait for their
	// epoch's ack (one per NIC).
	Outputs []*OutputBuffer
	// InitialRounds bounds the pre-copy rounds of the initial sync.
	InitialRounds int
	Logger        *slog.Logger
	// Disks are the logs of the guest's disks (in device order); each
	// epoch's writes travel in its checkpoint.
	Disks []*DiskLog
}

// testHooks are seams for this package's tests; production code passes
// none.
type testHooks struct {
	// atCut runs at every checkpoint's cut while the guest is paused
	// (tests compare the standby's memory or disk with the primary's).
	atCut func(epoch uint64)
}

// Replicator keeps a standby in step with a running machine.
type Replicator struct {
	m     *vmm.Machine
	cfg   ReplicateConfig
	hooks testHooks
	t     Transport
	tr    *dirtylog.Tracker
	log   *slog.Logger
	stop  chan struct{}
	done  chan struct{}
	acks  chan struct{} // closed when the ack goroutine has ended

	mu          sync.Mutex
	err         error // why replication ended (nil while running)
	protected   bool
	epoch       uint64
	recent      []EpochStats // ring of the last epochs, for metrics
	totals      totals
	resumedAt   map[uint64]time.Time
	lastResumed time.Time

	// Staging buffer, owned by the checkpoint goroutine: the dirty pages
	// of the checkpoint being streamed, kept across epochs.
	gpas    []guestmem.GPA
	staging []byte
}

// ErrStandbyLost is why replication ends when the standby stops answering.
var ErrStandbyLost = errors.New("standby lost: the guest runs unprotected")

// StartReplication connects to the standby, copies the whole guest while
// it runs (pre-copy rounds), then takes the first complete checkpoint and
// starts the epoch loop. From then on every network frame waits for its
// epoch's ack. It returns once the guest is protected.
func StartReplication(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig) (*Replicator, error) {
	return startReplication(ctx, m, cfg, testHooks{})
}

func startReplication(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig, hooks testHooks) (*Replicator, error) {
	if cfg.Epoch <= 0 {
		cfg.Epoch = 25 * time.Millisecond
	}
	if cfg.FailoverTimeout <= 0 {
		cfg.FailoverTimeout = 500 * time.Millisecond
	}
	if cfg.OnStandbyLoss == "" {
		cfg.OnStandbyLoss = OnStandbyLossContinue
	}
	if cfg.OnStandbyLoss != OnStandbyLossContinue && cfg.OnStandbyLoss != OnStandbyLossPause {
		return nil, fmt.Errorf("on-standby-loss %q: want %s or %s", cfg.OnStandbyLoss, OnStandbyLossContinue, OnStandbyLossPause)
	}
	if cfg.InitialRounds <= 0 {
		cfg.InitialRounds = 10
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	peer := cfg.To
	if cfg.Transport != nil {
		peer = fmt.Sprintf("%T", cfg.Transport)
	}
	r := &Replicator{m: m, cfg: cfg, hooks: hooks, log: cfg.Logger.With("component", "replicate", "standby", peer),
		stop: make(chan struct{}), done: make(chan struct{}), acks: make(chan struct{}), resumedAt: map[uint64]time.Time{}}
	r.t = cfg.Transport
	if r.t == nil {
		hb := cfg.FailoverTimeout / 4
		s, err := stream.Dial(ctx, cfg.To, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure, Identity: IdentityOf(m, cfg.Name),
			HeartbeatInterval: hb, FailoverTimeout: cfg.FailoverTimeout, Logger: cfg.Logger})
		if err != nil {
			return nil, fmt.Errorf("replicate to %s: %w", cfg.To, err)
		}
		r.t = s
	}
	var err error
	if r.tr, err = trackDirty(m); err != nil {
		_ = r.t.Close()
		return nil, fmt.Errorf("replicate: %w", err)
	}
	go r.ackLoop()
	// The standby's disk copies start identical to ours: from now on every
	// write is recorded and travels in the next resumable checkpoint.
	for _, d := range cfg.Disks {
		d.Arm()
	}
	if err := r.initialSync(ctx); err != nil {
		for _, d := range cfg.Disks {
			d.Disarm()
		}
		r.tr.Close()
		_ = r.t.Close()
		<-r.acks
		return nil, fmt.Errorf("replicate: initial sync: %w", err)
	}
	go r.loop()
	return r, nil
}

// initialSync sends the guest while it runs, round after round, then the
// first checkpoint (the whole remaining dirty set and the state), and
// waits for its ack.
func (r *Replicator) initialSync(ctx context.Context) error {
	pre, err := precopy{t: r.t, mem: r.m.Memory(), tr: r.tr, nextEpoch: r.nextEpoch,
		stopPages: 256, maxRounds: r.cfg.InitialRounds}.run(ctx)
	if err != nil {
		return err
	}
	// The first resumable checkpoint: output buffering starts at its cut.
	if err := r.checkpoint(pre.Dirty); err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := r.t.WaitAck(actx, r.currentEpoch()); err != nil {
		return fmt.Errorf("first checkpoint not acknowledged: %w", err)
	}
	r.mu.Lock()
	r.protected = true
	r.mu.Unlock()
	r.log.Info("guest protected", "epoch", r.currentEpoch())
	return nil
}

// checkpoint takes one checkpoint: pause, harvest (extra is ORed in),
// copy the dirty pages into a staging buffer, save the state, seal the
// epoch's output, resume; then stream it while the guest runs on.
func (r *Replicator) checkpoint(extra *dirtylog.Set) error {
	var es EpochStats
	t0 := time.Now()
	r.mu.Lock()
	if !r.lastResumed.IsZero() {
		es.Length = t0.Sub(r.lastResumed)
	}
	r.mu.Unlock()
	var (
		state          []byte
		epoch          uint64
		ts, t1, t2, t3 time.Time
	)
	err := r.m.WithPaused(context.Background(), func() error {
		ts = time.Now()
		set, err := r.tr.Harvest()
		if err != nil {
			return err
		}
		if extra != nil {
			set.Or(extra)
		}
		t1 = time.Now()
		if err := r.stage(set); err != nil {
			return err
		}
		t2 = time.Now()
		if state, err = cutState(r.m, r.cfg.Disks); err != nil {
			return err
		}
		epoch = r.nextEpoch()
		if r.hooks.atCut != nil {
			r.hooks.atCut(epoch)
		}
		if err := r.sealOutput(epoch); err != nil {
			return err
		}
		t3 = time.Now()
		return nil
	})
	if err != nil {
		return err
	}
	now := time.Now()
	es.Epoch, es.DirtyPages = epoch, len(r.gpas)
	es.Stop, es.Harvest, es.Copy, es.State, es.Pause = ts.Sub(t0), t1.Sub(ts), t2.Sub(t1), t3.Sub(t2), now.Sub(t0)
	r.mu.Lock()
	r.lastResumed = now
	r.resumedAt[epoch] = now
	r.mu.Unlock()

	before := r.t.Stats().BytesSent
	if err := r.send(epoch, state); err != nil {
		return err
	}
	es.Bytes = r.t.Stats().BytesSent - before
	r.record(es)
	return nil
}

// stage copies the pages of set into the staging buffer. The buffer is
// reused from epoch to epoch (streaming of the previous one is over by
// now): no page faults in the pause.
func (r *Replicator) stage(set *dirtylog.Set) error {
	mem := r.m.Memory()
	r.gpas = r.gpas[:0]
	r.staging = r.staging[:0]
	return set.ForEach(func(gpa guestmem.GPA) error {
		page, err := mem.Slice(gpa, guestmem.PageSize)
		if err != nil {
			return err
		}
		r.gpas = append(r.gpas, gpa)
		r.staging = append(r.staging, page...)
		return nil
	})
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

// send streams the staged checkpoint.
func (r *Replicator) send(epoch uint64, state []byte) error {
	if err := r.t.BeginCheckpoint(epoch, stream.KindEpoch); err != nil {
		return err
	}
	for i, gpa := range r.gpas {
		if err := r.t.SendPage(gpa, r.staging[i*guestmem.PageSize:(i+1)*guestmem.PageSize]); err != nil {
			return err
		}
	}
	if err := r.t.SendState(state); err != nil {
		return err
	}
	return r.t.EndCheckpoint()
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
// that sending output never delays the transport's reading of the wire.
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
	for _, o := range r.cfg.Outputs {
		if err := o.Release(epoch); err != nil {
			r.log.Warn("release output", "epoch", epoch, "err", err)
		}
	}
	r.mu.Lock()
	if t, ok := r.resumedAt[epoch]; ok {
		for i := len(r.recent) - 1; i >= 0; i-- {
			if r.recent[i].Epoch == epoch {
				r.recent[i].AckTime = time.Since(t)
				r.totals.AckSum += r.recent[i].AckTime
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

// loop takes a checkpoint every epoch until stopped or the standby is lost.
func (r *Replicator) loop() {
	defer close(r.done)
	t := time.NewTimer(r.cfg.Epoch)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			r.finish(nil)
			return
		case <-r.t.Done():
			r.lost(r.t.Err())
			return
		case <-t.C:
		}
		if err := r.checkpoint(nil); err != nil {
			r.lost(err)
			return
		}
		// The guest runs one epoch from its resume; streaming overlaps it.
		r.mu.Lock()
		next := r.cfg.Epoch - time.Since(r.lastResumed)
		r.mu.Unlock()
		if next < 0 {
			next = 0
		}
		t.Reset(next)
	}
}

// lost handles the standby going away: the guest is unprotected now.
func (r *Replicator) lost(cause error) {
	err := fmt.Errorf("%w: %v", ErrStandbyLost, cause)
	r.log.Error("STANDBY LOST: guest is UNPROTECTED", "err", cause, "policy", r.cfg.OnStandbyLoss)
	if r.cfg.OnStandbyLoss == OnStandbyLossPause {
		// Hold the output: nothing unacknowledged may leave.
		_ = r.m.Pause()
	} else {
		for _, o := range r.cfg.Outputs {
			o.Abandon()
		}
	}
	r.finish(err)
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
	_ = r.t.Close()
	<-r.acks
}

// Stop ends replication deliberately (the standby is told goodbye and
// discards its replica); the guest keeps running unprotected.
func (r *Replicator) Stop() {
	select {
	case <-r.stop:
	default:
		close(r.stop)
	}
	<-r.done
	for _, o := range r.cfg.Outputs {
		o.Unprotect()
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
