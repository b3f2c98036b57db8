package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// MigrateConfig parameterises a live migration.
type MigrateConfig struct {
	To       string // destination HOST:PORT (govmm standby --listen)
	Name     string // VM name in the hello
	Key      []byte // pre-shared key; nil needs Insecure
	Insecure bool   // loopback only, no key
	// Compression is the codec for the stream's pages
	// (stream.DefaultCompression, none, when zero).
	Compression stream.Compression
	// Cipher is what a keyed stream seals with (stream.Config.Cipher:
	// AEGIS-128L where both ends run it, when zero).
	Cipher stream.Cipher
	// SendBuffer: as ReplicateConfig's.
	SendBuffer int
	// Deltas: as ReplicateConfig's (each pre-copy round after the first
	// ships pages the destination holds as deltas).
	Deltas bool
	// StopPages: stop and copy once a round leaves at most this many dirty
	// pages (default 256, about 1 MiB).
	StopPages int
	// MaxRounds bounds the pre-copy rounds before stopping anyway
	// (default 30): a guest dirtying faster than the link converges never.
	MaxRounds int
	// AckTimeout bounds the wait for the destination's ack of the final
	// checkpoint (default 30 s); past it the source aborts the migration
	// (the destination discards it) and resumes the guest.
	AckTimeout time.Duration
	Progress   func(Progress)
	// Disks are the logs of the guest's disks (in device order): the
	// pre-copy copies each to the destination's copy, and every write
	// made meanwhile follows, the last ones in the final checkpoint.
	Disks []*DiskLog
	// Devices describe the guest's devices beyond their kind, by device
	// ID, as in ReplicateConfig.
	Devices map[string][]stream.Attr
	// Logger gets the migration's Debug lines (one per pre-copy round and
	// a breakdown at the end); nil means slog.Default().
	Logger *slog.Logger
	// Fence is the source's lease at the witness (nil without one): the
	// hello carries its generation, from which the destination claims the
	// next one before it runs the guest, and the source resigns it after
	// the final ack, just before the handover, so that the claim need not
	// wait for it to run out.
	Fence *Fence
}

// ErrHandoverUnconfirmed: the source sent the handover, but could not
// confirm it left; the destination may or may not be running the guest.
// The source stays paused, never resumed by govmm: an operator checks the
// destination first.
var ErrHandoverUnconfirmed = errors.New("handover sent but not confirmed")

// Progress is reported after each round.
type Progress struct {
	Round          int
	Phase          string // "precopy", "stop-and-copy", "done"
	BytesSent      uint64
	DirtyPages     uint64 // pages found dirty for the next round
	RemainingPages uint64
}

// MigrateResult summarises a finished migration.
type MigrateResult struct {
	TotalTime, Downtime time.Duration
	Rounds              int
	BytesSent           uint64
	PagesSent           uint64
	// DroppedProtection is the standby whose replication Node.Migrate
	// stopped to migrate (dropProtection), or "".
	DroppedProtection string
	// Where the time went: Connect is dialing and the stream's handshake;
	// Setup, from there to the first round (dirty tracking, disk logs,
	// the disks' copy); PreCopy the pre-copy rounds (RoundStats each);
	// AckWait the wait for the destination to acknowledge them; the rest
	// is the Downtime (stop and copy, the final ack, the handover).
	Connect, Setup, PreCopy, AckWait time.Duration
	RoundStats                       []RoundStats
}

// Migrate moves the running machine m to a standby: pre-copy rounds while
// the guest runs (the first sends every page, each later one the pages
// dirtied meanwhile), until the dirty set is small; then stop and copy:
// pause, quiesce, the last dirty pages and the machine state in a final
// checkpoint. Once the destination acknowledges it, the source sends the
// handover and never runs the guest again: Migrate returns with m handed
// over (vCPUs paused and devices quiesced for good, vmm.Machine.HandOver),
// and the caller stops it (after reporting). The destination
// runs the guest only on that handover. Without the ack in time (or when
// ctx ends first), the source tells the destination to discard the
// migration (a goodbye), the guest goes on running here, and the error
// says why: whichever way an ack and a timeout race, the guest never runs
// at both ends.
func Migrate(ctx context.Context, m *vmm.Machine, cfg MigrateConfig) (MigrateResult, error) {
	cfg.setDefaults()
	progress := cfg.Progress
	start := time.Now()
	var res MigrateResult
	log := cfg.Logger.With("component", "replicate", "peer", cfg.To)

	s, err := dialMigration(ctx, m, cfg)
	if err != nil {
		return res, err
	}
	defer s.Close() // a goodbye: the destination discards the migration
	res.Connect = time.Since(start)
	tracker, err := trackDirty(m)
	if err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	defer tracker.Close()
	for _, d := range cfg.Disks {
		d.Arm()
		defer d.Disarm()
	}

	epoch := uint64(0)
	next := func() uint64 { epoch++; return epoch }
	pre, err := precopy{t: s, mem: m.Memory(), tr: tracker, disks: cfg.Disks, nextEpoch: next,
		stopPages: cfg.StopPages, maxRounds: cfg.MaxRounds, log: log,
		onRound: func(round, dirty int) {
			progress(Progress{Round: round, Phase: "precopy", BytesSent: s.Stats().BytesSent,
				DirtyPages: uint64(dirty), RemainingPages: uint64(dirty)})
		}}.run(ctx)
	res.Rounds, res.PagesSent, res.BytesSent, res.RoundStats = pre.Rounds, pre.PagesSent, s.Stats().BytesSent, pre.Stats
	if err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	for _, r := range pre.Stats {
		res.PreCopy += r.Send + r.Harvest
	}
	res.Setup = time.Since(start) - res.Connect - res.PreCopy

	// Let the destination finish applying the pre-copy rounds first, so
	// the downtime is not spent waiting behind them.
	ackFrom := time.Now()
	if err := waitAck(ctx, s, epoch, cfg.AckTimeout); err != nil {
		return res, fmt.Errorf("migrate: pre-copy round %d not acknowledged: %w", res.Rounds, err)
	}
	res.AckWait = time.Since(ackFrom)

	// Stop and copy, at a consistent cut. On success the machine stays
	// paused: the guest lives on at the destination only.
	paused := time.Now()
	var handedOver bool
	var handoverErr error
	err = m.WithPaused(ctx, func() error {
		var err error
		handedOver, handoverErr, err = stopAndCopy(ctx, m, s, tracker, pre.Dirty, next(), cfg, progress, &res)
		return err
	})
	if handedOver && handoverErr != nil {
		return res, fmt.Errorf("migrate: %w: %w (the guest is paused here for good; check the destination)", ErrHandoverUnconfirmed, handoverErr)
	}
	if !handedOver {
		if err == nil {
			err = errors.New("migration did not hand over")
		}
		return res, fmt.Errorf("migrate: %w (the guest keeps running here)", err)
	}
	res.Downtime = time.Since(paused)
	res.TotalTime = time.Since(start)
	st := s.Stats()
	log.Debug("migration sent", "total", res.TotalTime, "connect", res.Connect, "setup", res.Setup,
		"precopy", res.PreCopy, "ack_wait", res.AckWait, "downtime", res.Downtime, "rounds", res.Rounds,
		"wire_bytes", res.BytesSent, "pages", res.PagesSent, "zero_pages", st.ZeroPages, "seal", st.SealTime, "write", st.WriteTime)
	progress(Progress{Round: res.Rounds, Phase: "done", BytesSent: res.BytesSent})
	return res, nil
}

// setDefaults fills in the fields left zero.
func (cfg *MigrateConfig) setDefaults() {
	if cfg.StopPages <= 0 {
		cfg.StopPages = 256
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = 30
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 30 * time.Second
	}
	if cfg.Progress == nil {
		cfg.Progress = func(Progress) {}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
}

// dialMigration connects to the destination, with the witness's
// generation settled first when there is one.
func dialMigration(ctx context.Context, m *vmm.Machine, cfg MigrateConfig) (*stream.Sender, error) {
	if cfg.Fence != nil {
		// The destination claims from the generation in the hello: one that
		// a standby left behind knows (replication just stopped, as a
		// forced migration does) must be advanced past first, or the
		// destination's claim would race the advance and lose after the
		// handover.
		if err := cfg.Fence.settle(ctx); err != nil {
			return nil, fmt.Errorf("migrate: %w", err)
		}
	}
	s, err := stream.Dial(ctx, cfg.To, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure,
		Identity: cfg.Fence.identity(IdentityOf(m, cfg.Name, cfg.Devices)), Compression: cfg.Compression, Deltas: cfg.Deltas, Cipher: cfg.Cipher, SendBuffer: cfg.SendBuffer})
	if err != nil {
		return nil, fmt.Errorf("migrate to %s: %w", cfg.To, err)
	}
	return s, nil
}

// waitAck waits at most timeout for the destination's ack of epoch.
func waitAck(ctx context.Context, s *stream.Sender, epoch uint64, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return s.WaitAck(ctx, epoch)
}

// stopAndCopy runs inside the stop-and-copy pause: the last dirty pages,
// the disk writes and the machine state as the final checkpoint, then the
// handover once it is acknowledged. handedOver says the point of no return
// was passed (the source must never run the guest again); handoverErr,
// that the Handover frame may not have left. Without the ack in time it
// aborts the migration (a goodbye) before returning the error, so that
// the caller may resume the guest here.
func stopAndCopy(ctx context.Context, m *vmm.Machine, s *stream.Sender, tracker *dirtylog.Tracker, set *dirtylog.Set,
	final uint64, cfg MigrateConfig, progress func(Progress), res *MigrateResult) (handedOver bool, handoverErr, err error) {
	last, err := tracker.Harvest()
	if err != nil {
		return false, nil, err
	}
	set.Or(last)
	state, writes, err := cutState(m, cfg.Disks, nil)
	if err != nil {
		return false, nil, err
	}
	res.Rounds++
	progress(Progress{Round: res.Rounds, Phase: "stop-and-copy", BytesSent: s.Stats().BytesSent, RemainingPages: uint64(set.Count())})
	if err := s.BeginCheckpoint(final, stream.KindFinal); err != nil {
		return false, nil, err
	}
	n, err := sendPages(s, m.Memory(), set, nil)
	res.PagesSent += n
	if err != nil {
		return false, nil, err
	}
	if err := sendWrites(s, writes); err != nil {
		return false, nil, err
	}
	if err := s.SendState(state); err != nil {
		return false, nil, err
	}
	if err := s.EndCheckpoint(); err != nil {
		return false, nil, err
	}
	if err := waitAck(ctx, s, final, cfg.AckTimeout); err != nil {
		// Abort before resuming here: the goodbye tells the destination
		// to discard the final checkpoint even if it acknowledged it just
		// now.
		_ = s.Close()
		return false, nil, fmt.Errorf("final checkpoint not acknowledged: %w", err)
	}
	// The point of no return: from the handover on, this side never runs
	// the guest again, even if sending it failed (it may have arrived).
	// Hand the machine over before the destination may start: leaving
	// WithPaused must neither let the vCPUs run here again nor resume the
	// devices, which would send the frames and execute the disk writes
	// queued at the cut while the destination runs the guest.
	res.BytesSent = s.Stats().BytesSent
	if err := m.HandOver(); err != nil {
		return false, nil, err
	}
	// With a witness, the lease ends here: this side never releases
	// output again, and the destination's claim is granted at once. If
	// the witness cannot be told, the lease runs out there by itself and
	// the claim waits for it.
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
	_ = cfg.Fence.resign(rctx)
	rcancel()
	handoverErr = s.Handover()
	return true, handoverErr, nil
}
