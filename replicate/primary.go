package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
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

// NullStandby as ReplicateConfig.To takes checkpoints and ships them
// nowhere, acknowledging each at once: it separates the cost of
// checkpointing from the cost of transfer (benchmarks only: the guest is
// not protected).
const NullStandby = "null"

// ReplicateConfig parameterises continuous replication to a standby.
type ReplicateConfig struct {
	To       string
	Name     string
	Key      []byte
	Insecure bool
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
	// AtCut, if set, runs at every checkpoint's cut while the guest is
	// paused (tests compare the standby's memory with the primary's).
	AtCut func(epoch uint64)
}

// EpochStats describes one checkpoint.
type EpochStats struct {
	Epoch      uint64
	Pause      time.Duration // guest stopped: stop + harvest + copy + state + resume
	Stop       time.Duration // pausing the vCPUs and quiescing devices
	Harvest    time.Duration
	Copy       time.Duration
	State      time.Duration
	DirtyPages int
	Bytes      uint64        // on the wire for this checkpoint
	AckTime    time.Duration // from resume to the standby's ack
	Length     time.Duration // from the previous resume to this pause
}

// Replicator keeps a standby in step with a running machine.
type Replicator struct {
	m    *vmm.Machine
	cfg  ReplicateConfig
	s    *stream.Sender
	tr   *dirtylog.Tracker
	log  *slog.Logger
	stop chan struct{}
	done chan struct{}

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

type totals struct {
	Epochs, DirtyPages, Bytes uint64
	PauseSum, AckSum          time.Duration
	Acked                     uint64
}

// ErrStandbyLost is why replication ends when the standby stops answering.
var ErrStandbyLost = errors.New("standby lost: the guest runs unprotected")

const recentEpochs = 1024

// StartReplication connects to the standby, copies the whole guest while
// it runs (pre-copy rounds), then takes the first complete checkpoint and
// starts the epoch loop. From then on every network frame waits for its
// epoch's ack. It returns once the guest is protected.
func StartReplication(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig) (*Replicator, error) {
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
	r := &Replicator{m: m, cfg: cfg, log: cfg.Logger.With("component", "replicate", "standby", cfg.To),
		stop: make(chan struct{}), done: make(chan struct{}), resumedAt: map[uint64]time.Time{}}
	var err error
	if cfg.To != NullStandby {
		hb := cfg.FailoverTimeout / 4
		r.s, err = stream.Dial(ctx, cfg.To, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure, Identity: IdentityOf(m, cfg.Name),
			HeartbeatInterval: hb, FailoverTimeout: cfg.FailoverTimeout, OnAck: r.onAck})
		if err != nil {
			return nil, fmt.Errorf("replicate to %s: %w", cfg.To, err)
		}
	}
	if r.tr, err = m.TrackDirty(dirtylog.Options{ManualProtect: true}); err != nil {
		r.closeStream()
		return nil, fmt.Errorf("replicate: %w", err)
	}
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
		r.closeStream()
		return nil, fmt.Errorf("replicate: initial sync: %w", err)
	}
	go r.loop()
	return r, nil
}

// initialSync sends the guest while it runs, round after round, then the
// first checkpoint (the whole remaining dirty set and the state).
func (r *Replicator) initialSync(ctx context.Context) error {
	if r.s == nil { // --replicate-to null: nothing to sync
		if err := r.checkpoint(nil); err != nil {
			return err
		}
		r.mu.Lock()
		r.protected = true
		r.mu.Unlock()
		return nil
	}
	mem := r.m.Memory()
	set := dirtylog.NewFullSet(mem)
	for round := 1; round <= r.cfg.InitialRounds; round++ {
		if err := r.s.BeginCheckpoint(r.nextEpoch(), stream.KindInitialSync); err != nil {
			return err
		}
		err := set.ForEach(func(gpa guestmem.GPA) error {
			page, err := mem.Slice(gpa, guestmem.PageSize)
			if err != nil {
				return err
			}
			return r.s.SendPage(gpa, page)
		})
		if err != nil {
			return err
		}
		if err := r.s.EndCheckpoint(); err != nil {
			return err
		}
		var herr error
		if set, herr = r.tr.Harvest(); herr != nil {
			return herr
		}
		if set.Count() <= 256 {
			break
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	// The first resumable checkpoint: output buffering starts at its cut.
	if err := r.checkpoint(set); err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := r.s.WaitAck(actx, r.currentEpoch()); err != nil {
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
		mem := r.m.Memory()
		// The staging buffer is reused from epoch to epoch (streaming of
		// the previous one is over by now): no page faults in the pause.
		r.gpas = r.gpas[:0]
		r.staging = r.staging[:0]
		err = set.ForEach(func(gpa guestmem.GPA) error {
			page, err := mem.Slice(gpa, guestmem.PageSize)
			if err != nil {
				return err
			}
			r.gpas = append(r.gpas, gpa)
			r.staging = append(r.staging, page...)
			return nil
		})
		if err != nil {
			return err
		}
		t2 = time.Now()
		if state, err = cutState(r.m, r.cfg.Disks); err != nil {
			return err
		}
		epoch = r.nextEpoch()
		if r.cfg.AtCut != nil {
			r.cfg.AtCut(epoch)
		}
		first := !r.isProtected()
		for _, o := range r.cfg.Outputs {
			if first {
				o.StartEpochs(epoch + 1) // output from now on waits for acks
			} else {
				o.Seal()
			}
		}
		t3 = time.Now()
		return nil
	})
	if err != nil {
		return err
	}
	now := time.Now()
	gpas, staging := r.gpas, r.staging
	es.Epoch, es.DirtyPages = epoch, len(gpas)
	es.Stop, es.Harvest, es.Copy, es.State, es.Pause = ts.Sub(t0), t1.Sub(ts), t2.Sub(t1), t3.Sub(t2), now.Sub(t0)
	r.mu.Lock()
	r.lastResumed = now
	r.resumedAt[epoch] = now
	r.mu.Unlock()

	if r.s == nil {
		// Shipped to nowhere: the checkpoint's cost without its transfer.
		r.record(es)
		r.onAck(epoch)
		return nil
	}
	before := r.s.Stats().BytesSent
	if err := r.s.BeginCheckpoint(epoch, stream.KindEpoch); err != nil {
		return err
	}
	for i, gpa := range gpas {
		if err := r.s.SendPage(gpa, staging[i*guestmem.PageSize:(i+1)*guestmem.PageSize]); err != nil {
			return err
		}
	}
	if err := r.s.SendState(state); err != nil {
		return err
	}
	if err := r.s.EndCheckpoint(); err != nil {
		return err
	}
	es.Bytes = r.s.Stats().BytesSent - before
	r.record(es)
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

// onAck releases the output of every epoch up to epoch (stream goroutine).
func (r *Replicator) onAck(epoch uint64) {
	for _, o := range r.cfg.Outputs {
		if err := o.Release(epoch); err != nil && !errors.Is(err, ErrReleaseOrder) {
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

func (r *Replicator) record(es EpochStats) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recent = append(r.recent, es)
	if len(r.recent) > recentEpochs {
		r.recent = r.recent[len(r.recent)-recentEpochs:]
	}
	r.totals.Epochs++
	r.totals.DirtyPages += uint64(es.DirtyPages)
	r.totals.Bytes += es.Bytes
	r.totals.PauseSum += es.Pause
}

// loop takes a checkpoint every epoch until stopped or the standby is lost.
func (r *Replicator) loop() {
	defer close(r.done)
	t := time.NewTimer(r.cfg.Epoch)
	defer t.Stop()
	var streamDone <-chan struct{} // nil (never ready) without a stream
	if r.s != nil {
		streamDone = r.s.Done()
	}
	for {
		select {
		case <-r.stop:
			r.finish(nil)
			return
		case <-streamDone:
			r.lost(r.s.Err())
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
	r.closeStream()
}

func (r *Replicator) closeStream() {
	if r.s != nil {
		_ = r.s.Close()
	}
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

// ReplicationStats summarise replication for metrics.
type ReplicationStats struct {
	Protected                    bool
	Epoch, Acked                 uint64
	Epochs, DirtyPages, Bytes    uint64
	PauseSum, AckSum             time.Duration
	PauseP50, PauseP99, PauseMax time.Duration
	Last                         EpochStats
}

// Stats reports counters and the pause-time distribution of recent epochs.
func (r *Replicator) Stats() ReplicationStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := ReplicationStats{Protected: r.protected, Epoch: r.epoch, Acked: r.totals.Acked, Epochs: r.totals.Epochs,
		DirtyPages: r.totals.DirtyPages, Bytes: r.totals.Bytes, PauseSum: r.totals.PauseSum, AckSum: r.totals.AckSum}
	if len(r.recent) > 0 {
		s.Last = r.recent[len(r.recent)-1]
		p := make([]time.Duration, len(r.recent))
		for i, e := range r.recent {
			p[i] = e.Pause
		}
		sort.Slice(p, func(i, j int) bool { return p[i] < p[j] })
		s.PauseP50, s.PauseP99, s.PauseMax = p[len(p)/2], p[(len(p)*99)/100], p[len(p)-1]
	}
	return s
}

// Recent returns the stats of the last epochs (oldest first).
func (r *Replicator) Recent() []EpochStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]EpochStats(nil), r.recent...)
}
