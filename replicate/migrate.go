package replicate

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"govmm/dirtylog"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// MigrateConfig parameterises a live migration.
type MigrateConfig struct {
	To       string // destination HOST:PORT (govmm standby --listen)
	Name     string // VM name in the hello
	Key      []byte // pre-shared key; nil needs Insecure
	Insecure bool   // loopback only, no key
	// StopPages: stop and copy once a round leaves at most this many dirty
	// pages (default 256, about 1 MiB).
	StopPages int
	// MaxRounds bounds the pre-copy rounds before stopping anyway
	// (default 30): a guest dirtying faster than the link converges never.
	MaxRounds int
	// AckTimeout bounds the wait for the destination's ack of the final
	// checkpoint (default 30 s); past it the source resumes the guest.
	AckTimeout time.Duration
	Progress   func(Progress)
	// Disks are the logs of the guest's disks (in device order): the
	// destination has its own copies, identical when the migration
	// starts, and every write made during it travels in the final
	// checkpoint.
	Disks []*DiskLog
}

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
}

// Migrate moves the running machine m to a standby: pre-copy rounds while
// the guest runs (the first sends every page, each later one the pages
// dirtied meanwhile), until the dirty set is small; then stop and copy:
// pause, quiesce, the last dirty pages and the machine state in a final
// checkpoint. Once the destination acknowledges it, the source never runs
// the guest again: Migrate returns with m handed over (vCPUs paused and
// devices quiesced for good, vmm.Machine.HandOver), and the caller stops
// it (after reporting). On any failure before that ack, the guest
// goes on running here and the error says why.
func Migrate(ctx context.Context, m *vmm.Machine, cfg MigrateConfig) (MigrateResult, error) {
	if cfg.StopPages <= 0 {
		cfg.StopPages = 256
	}
	if cfg.MaxRounds <= 0 {
		cfg.MaxRounds = 30
	}
	if cfg.AckTimeout <= 0 {
		cfg.AckTimeout = 30 * time.Second
	}
	progress := cfg.Progress
	if progress == nil {
		progress = func(Progress) {}
	}
	start := time.Now()
	var res MigrateResult
	mem := m.Memory()

	s, err := stream.Dial(ctx, cfg.To, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure, Identity: IdentityOf(m, cfg.Name)})
	if err != nil {
		return res, fmt.Errorf("migrate to %s: %w", cfg.To, err)
	}
	defer s.Close()
	tracker, err := m.TrackDirty(dirtylog.Options{ManualProtect: true})
	if err != nil {
		return res, fmt.Errorf("migrate: %w", err)
	}
	defer tracker.Close()
	for _, d := range cfg.Disks {
		d.Arm()
		defer d.Disarm()
	}

	sendSet := func(set *dirtylog.Set) error {
		return set.ForEach(func(gpa guestmem.GPA) error {
			page, err := mem.Slice(gpa, guestmem.PageSize)
			if err != nil {
				return err
			}
			res.PagesSent++
			return s.SendPage(gpa, page)
		})
	}

	// Pre-copy. Dirty logging started before the first page was read, so
	// a page written while it is being sent shows up in the next harvest.
	set := dirtylog.NewFullSet(mem)
	epoch := uint64(0)
	for {
		epoch++
		res.Rounds++
		if err := s.BeginCheckpoint(epoch, stream.KindInitialSync); err != nil {
			return res, fmt.Errorf("migrate round %d: %w", res.Rounds, err)
		}
		if err := sendSet(set); err != nil {
			return res, fmt.Errorf("migrate round %d: %w", res.Rounds, err)
		}
		if err := s.EndCheckpoint(); err != nil {
			return res, fmt.Errorf("migrate round %d: %w", res.Rounds, err)
		}
		if set, err = tracker.Harvest(); err != nil {
			return res, fmt.Errorf("migrate round %d: %w", res.Rounds, err)
		}
		res.BytesSent = s.Stats().BytesSent
		progress(Progress{Round: res.Rounds, Phase: "precopy", BytesSent: res.BytesSent,
			DirtyPages: uint64(set.Count()), RemainingPages: uint64(set.Count())})
		if set.Count() <= cfg.StopPages || res.Rounds >= cfg.MaxRounds {
			break
		}
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("migrate: %w", err)
		}
	}

	// Let the destination finish applying the pre-copy rounds first, so
	// the downtime is not spent waiting behind them.
	wctx, wcancel := context.WithTimeout(ctx, cfg.AckTimeout)
	err = s.WaitAck(wctx, epoch)
	wcancel()
	if err != nil {
		return res, fmt.Errorf("migrate: pre-copy round %d not acknowledged: %w", res.Rounds, err)
	}

	// Stop and copy, at a consistent cut. On success the machine stays
	// paused: the guest lives on at the destination only.
	paused := time.Now()
	handedOver := false
	err = m.WithPaused(ctx, func() error {
		last, err := tracker.Harvest()
		if err != nil {
			return err
		}
		set.Or(last)
		state, err := cutState(m, cfg.Disks)
		if err != nil {
			return err
		}
		epoch++
		res.Rounds++
		progress(Progress{Round: res.Rounds, Phase: "stop-and-copy", BytesSent: s.Stats().BytesSent, RemainingPages: uint64(set.Count())})
		if err := s.BeginCheckpoint(epoch, stream.KindFinal); err != nil {
			return err
		}
		if err := sendSet(set); err != nil {
			return err
		}
		if err := s.SendState(state); err != nil {
			return err
		}
		if err := s.EndCheckpoint(); err != nil {
			return err
		}
		actx, cancel := context.WithTimeout(ctx, cfg.AckTimeout)
		err = s.WaitAck(actx, epoch)
		cancel()
		if err != nil {
			return fmt.Errorf("final checkpoint not acknowledged: %w", err)
		}
		// Handover: the destination has everything. Never run the
		// guest here again, and keep the devices quiesced: leaving
		// WithPaused must not let a queued frame or disk write out
		// while the destination runs. Then say goodbye, which lets
		// the destination start.
		res.BytesSent = s.Stats().BytesSent
		if err := m.HandOver(); err != nil {
			return err
		}
		handedOver = true
		_ = s.Close()
		return nil
	})
	if !handedOver {
		if err == nil {
			err = errors.New("migration did not hand over")
		}
		return res, fmt.Errorf("migrate: %w (the guest keeps running here)", err)
	}
	res.Downtime = time.Since(paused)
	res.TotalTime = time.Since(start)
	progress(Progress{Round: res.Rounds, Phase: "done", BytesSent: res.BytesSent})
	return res, nil
}

// Standby receives a migration: it listens, accepts the source (refusing
// strangers), builds the destination machine from the source's identity,
// writes every round into its memory, and starts the guest from the final
// checkpoint once the source has handed over.
type Standby struct {
	ln   *stream.Listener
	sink *stream.StagingSink
	cfg  StandbyConfig
}

// StandbyConfig configures a migration destination.
type StandbyConfig struct {
	Listen   string
	Key      []byte
	Insecure bool
	// Build creates the destination machine (devices attached, not
	// started) for the source's identity.
	Build func(id stream.Identity) (*vmm.Machine, error)
	// BeforeStart, if set, sees the machine with the final memory and
	// state just before it starts (tests compare memory there).
	BeforeStart func(m *vmm.Machine, st *vmm.MachineState) error
	// OnRefused is told about connections refused at the handshake.
	OnRefused func(err error)
	// OnCheckpoint is told about each committed resumable checkpoint.
	OnCheckpoint func(epoch uint64)
	// Disks are the standby's copies of the guest's disks (in device
	// order), which must start identical to the primary's; each
	// checkpoint's writes are applied and synced before its ack.
	Disks []*os.File
}

// NewStandby listens on cfg.Listen (without a key, only on loopback).
func NewStandby(cfg StandbyConfig) (*Standby, error) {
	sb := &Standby{sink: &stream.StagingSink{}, cfg: cfg}
	ln, err := stream.Listen(cfg.Listen, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure, Sink: sb.sink})
	if err != nil {
		return nil, err
	}
	sb.ln = ln
	return sb, nil
}

// Addr is where the standby listens.
func (sb *Standby) Addr() string { return sb.ln.Addr().String() }

// Close stops listening.
func (sb *Standby) Close() error { return sb.ln.Close() }

// accept waits for our source, refusing strangers (who do not end the
// wait), and builds the machine it describes, whose memory the staged
// checkpoints then land in.
func (sb *Standby) accept(ctx context.Context) (*stream.Receiver, *vmm.Machine, error) {
	for {
		r, err := sb.ln.Accept(ctx)
		if err != nil {
			if errors.Is(err, stream.ErrAuth) || errors.Is(err, stream.ErrMismatch) || errors.Is(err, stream.ErrVersion) {
				if sb.cfg.OnRefused != nil {
					sb.cfg.OnRefused(err)
				}
				continue
			}
			return nil, nil, err
		}
		m, err := sb.cfg.Build(r.Peer())
		if err != nil {
			r.Close()
			return nil, nil, fmt.Errorf("standby: build machine for %s: %w", r.Peer().Name, err)
		}
		if err := checkShape(m, r.Peer()); err != nil {
			m.Close()
			r.Close()
			return nil, nil, fmt.Errorf("standby: %w", err)
		}
		sb.sink.Dest = m.Memory()
		return r, m, nil
	}
}

// ReceiveMigration waits for a source and returns the running migrated
// machine. A stream that fails midway leaves nothing running.
func (sb *Standby) ReceiveMigration(ctx context.Context) (*vmm.Machine, error) {
	r, m, err := sb.accept(ctx)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var final *vmm.MachineState
	// The final checkpoint's state is decoded before it commits: a state
	// that does not decode is refused and the source keeps the guest.
	commit := func(c *stream.Checkpoint) error {
		if c.Kind != stream.KindFinal {
			return nil
		}
		st, err := applyCheckpoint(m, sb.cfg.Disks, c.State)
		if err != nil {
			return err
		}
		final = st
		return nil
	}
	r.SetOnCommit(commit)
	if err := r.Run(ctx); err != nil {
		m.Close()
		return nil, fmt.Errorf("standby: migration stream: %w", err)
	}
	if !r.HandedOver() || final == nil {
		m.Close()
		return nil, errors.New("standby: the source ended the stream without handing over")
	}
	if sb.cfg.BeforeStart != nil {
		if err := sb.cfg.BeforeStart(m, final); err != nil {
			m.Close()
			return nil, err
		}
	}
	if err := m.StartFrom(final); err != nil {
		m.Close()
		return nil, fmt.Errorf("standby: start migrated guest: %w", err)
	}
	return m, nil
}

// Takeover says why and from where a standby took over.
type Takeover struct {
	Epoch uint64 // the checkpoint the guest resumed from
	Cause error  // why the primary was declared lost
	Took  time.Duration
}

// ReceiveReplication keeps a replica of the primary's guest: every
// committed epoch checkpoint is applied to this machine's memory (staged
// until its commit, so a partial checkpoint never lands) and its state
// kept. When the primary is lost (no frame within the failure timeout, or
// the stream breaks), the replica becomes the running guest from the last
// committed checkpoint, with no copy of memory, and the machine is
// returned. A deliberate goodbye from the primary (replication stopped)
// returns an error and nothing runs; a migration's handover runs the guest.
func (sb *Standby) ReceiveReplication(ctx context.Context, failoverTimeout time.Duration) (*vmm.Machine, Takeover, error) {
	var tk Takeover
	if failoverTimeout <= 0 {
		failoverTimeout = 500 * time.Millisecond
	}
	sb.ln.SetFailoverTimeout(failoverTimeout)
	r, m, err := sb.accept(ctx)
	if err != nil {
		return nil, tk, err
	}
	defer r.Close()
	var latest *vmm.MachineState
	var latestEpoch uint64
	r.SetOnCommit(func(c *stream.Checkpoint) error {
		if !c.Kind.Resumable() {
			return nil
		}
		st, err := applyCheckpoint(m, sb.cfg.Disks, c.State)
		if err != nil {
			return err
		}
		latest, latestEpoch = st, c.Epoch
		if sb.cfg.OnCheckpoint != nil {
			sb.cfg.OnCheckpoint(c.Epoch)
		}
		return nil
	})
	runErr := r.Run(ctx)
	detected := time.Now()
	switch {
	case runErr == nil && r.HandedOver():
		// a planned handover (migration): run it.
	case runErr == nil:
		m.Close()
		return nil, tk, errors.New("standby: the primary stopped replication; the replica is discarded")
	case !primaryLost(runErr):
		// A corrupted, forged or refused stream says nothing about the
		// primary's health: taking over could run the guest twice. The
		// replica is dropped; the primary goes on unprotected.
		m.Close()
		return nil, tk, fmt.Errorf("standby: stream refused, not taking over (the primary runs unprotected): %w", runErr)
	case latest == nil:
		m.Close()
		return nil, tk, fmt.Errorf("standby: primary lost before the first checkpoint, nothing to resume: %w", runErr)
	}
	tk = Takeover{Epoch: latestEpoch, Cause: runErr}
	if sb.cfg.BeforeStart != nil {
		if err := sb.cfg.BeforeStart(m, latest); err != nil {
			m.Close()
			return nil, tk, err
		}
	}
	if err := m.StartFrom(latest); err != nil {
		m.Close()
		return nil, tk, fmt.Errorf("standby: resume replica at epoch %d: %w", latestEpoch, err)
	}
	tk.Took = time.Since(detected)
	return m, tk, nil
}

// primaryLost tells a dead or unreachable primary (silence, or its end of
// the connection gone without a goodbye) from a stream that is corrupt or
// not from our primary, after which the standby must not take over.
func primaryLost(err error) bool {
	if errors.Is(err, stream.ErrPeer) {
		return false // the primary itself refused something: it is alive
	}
	return errors.Is(err, stream.ErrTimeout) || errors.Is(err, stream.ErrTruncated)
}
