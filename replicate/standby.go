package replicate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

// Standby is the receiving end of replication and of live migration: it
// listens, accepts its source (refusing strangers, and sources whose VM
// its machine could not run), builds the machine the source describes,
// and writes every checkpoint into its memory and disks. A replica
// becomes the running guest when its primary is lost (failover); a
// migrated guest runs once the source has handed over.
//
// A connection that is not a usable source (a stranger, a wrong key, a
// garbled or silent hello, another source while one is served, a VM of
// another shape) is refused, told why when it authenticated, and reported
// to OnRefused; the standby keeps listening, and a source it serves is
// not disturbed.
type Standby struct {
	ln  *stream.Listener
	cfg StandbyConfig
	log *slog.Logger

	// The witness poller (with a witness): it asks the witness how things
	// stand every half lease, for Status, until the guest runs here or
	// Close.
	pollCtx    context.Context
	pollCancel context.CancelFunc
	pollDone   chan struct{}

	mu      sync.Mutex // guards pending and st
	pending *Replica   // built by verify for the sender Accept returns next
	st      standbyState

	// Test seams (see export_test.go); nil in production.
	// beforeStart sees the machine with the memory and state it is about
	// to start from; onCheckpoint is told of each committed resumable
	// checkpoint.
	beforeStart  func(m *vmm.Machine, st *vmm.MachineState) error
	onCheckpoint func(epoch uint64)
}

// Replica is a machine built here to receive a source's guest.
type Replica struct {
	Machine *vmm.Machine
	// NICs are announced (RARP, GARP) when the guest starts here.
	NICs []NIC
	// Devices describe its devices beyond their kind, by device ID, as
	// ReplicateConfig.Devices does on the source: they must match.
	Devices map[string][]stream.Attr
	// Close releases the machine and what Build opened for it, when the
	// standby discards the replica; nil means Machine.Close. A replica
	// that runs the guest is the caller's to close.
	Close func()
	// Disks are the logs of its disks (DiskLog.AllowWrite wired into
	// them): with a witness, they refuse writes if the guest taken over
	// here is fenced later.
	Disks []*DiskLog
}

func (r *Replica) close() {
	if r.Close != nil {
		r.Close()
		return
	}
	r.Machine.Close()
}

// StandbyConfig configures a standby or migration destination.
type StandbyConfig struct {
	Listen   string
	Key      []byte
	Insecure bool
	// Compression: stream.CompressNone refuses compressed pages; any
	// other value accepts every codec the stream knows.
	Compression stream.Compression
	// Cipher is what a keyed stream seals with (stream.Config.Cipher:
	// AEGIS-128L where both ends run it, when zero).
	Cipher stream.Cipher
	// Deltas accepts XOR deltas and copies from a primary that asks for
	// them (the stream then keeps a copy of the guest's memory as
	// shipped).
	Deltas bool
	// FailoverTimeout: while listening, without a byte from the primary
	// for this long, it is declared lost (DefaultFailoverTimeout). The
	// primary's, if larger, wins.
	FailoverTimeout time.Duration
	// ReadSpin is stream.Config's: how long the reader polls inside a
	// checkpoint before it sleeps (0: stream.DefaultReadSpin; negative:
	// never).
	ReadSpin time.Duration
	// Build creates the machine (devices attached, not started) for the
	// source's identity. The standby checks it against the source's
	// identity and closes it if it does not match.
	Build func(id stream.Identity) (Replica, error)
	// OnRefused is told about every connection refused (see Standby).
	OnRefused func(err error)
	// Disks are the standby's copies of the guest's disks (in device
	// order), files or block devices of the same sizes as the source's:
	// the initial sync copies the source's disks into them, and each
	// checkpoint's writes are applied and synced before its ack.
	Disks []*os.File
	// KeepAllocated, by disk (missing entries are false), keeps that copy
	// allocated (its --disk's nodiscard): a zero run, whether a hole in
	// the source's image or a discard, is zeroed in place
	// (virtio.ImageZeroer.KeepAllocated) rather than punched, so a guest
	// that takes over here cannot run its disk out of space.
	KeepAllocated []bool
	// Witness, if set, is this standby's client of the witness
	// (docs/FENCING.md): the guest of a primary that is lost runs here
	// only after this standby has won the next generation there (the
	// replica is kept, and the claim retried, while the witness does not
	// answer); a migrated guest, likewise. A source without a witness
	// generation is refused, as a standby without Witness refuses one
	// with a generation: either way the guest could run twice without
	// the arbiter's consent. Its VM name must be the source's.
	Witness *witness.Client
	Logger  *slog.Logger
}

// NewStandby listens on cfg.Listen (without a key, only on loopback).
func NewStandby(cfg StandbyConfig) (*Standby, error) {
	if cfg.FailoverTimeout == 0 {
		cfg.FailoverTimeout = DefaultFailoverTimeout
	}
	if err := CheckFailoverTimeout(cfg.FailoverTimeout); err != nil {
		return nil, fmt.Errorf("failover timeout %v: %w", cfg.FailoverTimeout, err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	sb := &Standby{cfg: cfg, log: cfg.Logger.With("component", "replicate", "role", "standby"),
		pollDone: make(chan struct{}), st: standbyState{phase: PhaseListening}}
	ln, err := stream.Listen(cfg.Listen, stream.Config{Key: cfg.Key, Insecure: cfg.Insecure,
		FailoverTimeout: cfg.FailoverTimeout, HeartbeatInterval: cfg.FailoverTimeout / 4, Compression: cfg.Compression,
		Deltas: cfg.Deltas, Cipher: cfg.Cipher, ReadSpin: cfg.ReadSpin, Verify: sb.verify, OnRefused: sb.refused, Logger: cfg.Logger})
	if err != nil {
		return nil, err
	}
	sb.ln = ln
	sb.pollCtx, sb.pollCancel = context.WithCancel(context.Background())
	if cfg.Witness != nil {
		go sb.poll()
	} else {
		close(sb.pollDone)
	}
	return sb, nil
}

// Addr is where the standby listens.
func (sb *Standby) Addr() string { return sb.ln.Addr().String() }

// Close stops listening (and asking the witness).
func (sb *Standby) Close() error {
	sb.pollCancel()
	<-sb.pollDone
	err := sb.ln.Close()
	sb.mu.Lock()
	if sb.pending != nil {
		sb.pending.close()
		sb.pending = nil
	}
	sb.mu.Unlock()
	return err
}

func (sb *Standby) refused(err error) {
	if sb.cfg.OnRefused != nil {
		sb.cfg.OnRefused(err)
		return
	}
	sb.log.Warn("refused a connection", "err", err)
}

// verify builds the machine for an authenticated source and checks that
// it could run the source's guest (the Listener calls it, one at a time,
// only while an accept waits).
func (sb *Standby) verify(peer stream.Identity) error {
	if err := sb.checkWitness(peer); err != nil {
		return err
	}
	rep, err := sb.cfg.Build(peer)
	if err != nil {
		return fmt.Errorf("build a machine for %s: %w", peer.Name, err)
	}
	if err := checkShape(rep.Machine, rep.Devices, peer); err != nil {
		rep.close()
		return err
	}
	sb.mu.Lock()
	if sb.pending != nil { // built for a sender whose Accept gave up
		sb.pending.close()
	}
	sb.pending = &rep
	sb.mu.Unlock()
	return nil
}

// accept waits for a source and returns its stream, with the machine
// verify built for it and fresh sinks into that machine's memory and the
// disk copies.
func (sb *Standby) accept(ctx context.Context) (*stream.Receiver, *Replica, error) {
	r, err := sb.ln.Accept(ctx)
	if err != nil {
		return nil, nil, err
	}
	sb.mu.Lock()
	rep := sb.pending
	sb.pending = nil
	sb.mu.Unlock()
	disks, err := newDiskSink(sb.cfg.Disks, sb.cfg.KeepAllocated)
	if err != nil {
		r.Close()
		rep.close()
		return nil, nil, fmt.Errorf("standby: disks: %w", err)
	}
	r.SetSinks(&stream.StagingSink{Dest: rep.Machine.Memory()}, disks)
	sb.setFollowing(r)
	return r, rep, nil
}

// ReceiveMigration waits for a source and returns the running migrated
// machine, its MAC announced, and with a witness the Fence holding the
// generation it claimed after the handover. A stream that fails midway,
// or a source that aborts, leaves nothing running.
func (sb *Standby) ReceiveMigration(ctx context.Context) (*vmm.Machine, *Fence, error) {
	r, rep, err := sb.accept(ctx)
	if err != nil {
		return nil, nil, err
	}
	defer sb.detach(r)
	defer r.Close()
	var final *vmm.MachineState
	// The final checkpoint's state is decoded and checked before it
	// commits: a state that does not decode, or that this machine could
	// not resume (CPU features, TSC rate), is refused and the source keeps
	// the guest.
	r.SetOnCommit(func(c *stream.Checkpoint) error {
		if c.Kind != stream.KindFinal {
			return nil
		}
		st, err := decodeState(rep.Machine, c.State)
		if err != nil {
			return err
		}
		final = st
		if sb.onCheckpoint != nil {
			sb.onCheckpoint(c.Epoch)
		}
		return nil
	})
	if err := r.Run(ctx); err != nil {
		rep.close()
		sb.setListening("migration stream failed")
		return nil, nil, fmt.Errorf("standby: migration stream: %w", err)
	}
	if !r.HandedOver() || final == nil {
		rep.close()
		sb.setListening("the source ended the migration without handing over")
		return nil, nil, errors.New("standby: the source ended the migration without handing over; nothing runs here")
	}
	fence, _, err := sb.takeGeneration(ctx, r.Peer(), rep)
	if err != nil {
		rep.close()
		return nil, nil, fmt.Errorf("standby: migrated guest not started: %w", err)
	}
	if err := sb.start(rep.Machine, final, rep.NICs); err != nil {
		rep.close()
		if fence != nil {
			fence.Close()
		}
		return nil, nil, fmt.Errorf("standby: start migrated guest: %w", err)
	}
	sb.setRunning(fence)
	return rep.Machine, fence, nil
}

// ReceiveReplication keeps a replica of a primary's guest: every
// committed epoch checkpoint is applied to the replica's memory (staged
// until its commit, so a partial checkpoint never lands) and disks, and
// its state kept. When the primary is lost (silence while listening, or
// the connection gone without a goodbye), the replica becomes the running
// guest from the last committed checkpoint, with no copy of memory, its
// MACs are announced, and the machine is returned. A primary that ends
// replication on purpose (goodbye) makes it return an error with nothing
// running; a migration's handover runs the guest. A stream that is
// refused (corrupt, forged, or refused by the primary) says nothing of
// the primary's health: the replica is dropped, nothing runs, and the
// standby listens again, as it does when a primary is lost before its
// first checkpoint.
func (sb *Standby) ReceiveReplication(ctx context.Context) (*vmm.Machine, Takeover, error) {
	for {
		r, rep, err := sb.accept(ctx)
		if err != nil {
			return nil, Takeover{}, err
		}
		m, tk, err := sb.follow(ctx, r, rep)
		if errors.Is(err, errListenAgain) {
			sb.refused(err)
			continue
		}
		return m, tk, err
	}
}

// errListenAgain wraps why a stream ended with nothing to run and the
// standby should wait for a source again.
var errListenAgain = errors.New("listening again")

// follow keeps rep in step with the stream r until it ends, then decides.
func (sb *Standby) follow(ctx context.Context, r *stream.Receiver, rep *Replica) (*vmm.Machine, Takeover, error) {
	defer sb.detach(r)
	defer r.Close()
	var latest *vmm.MachineState
	var latestEpoch uint64
	r.SetOnCommit(func(c *stream.Checkpoint) error {
		if !c.Kind.Resumable() {
			return nil
		}
		st, err := decodeState(rep.Machine, c.State)
		if err != nil {
			return err
		}
		latest, latestEpoch = st, c.Epoch
		sb.setCheckpoint(c.Epoch)
		if sb.onCheckpoint != nil {
			sb.onCheckpoint(c.Epoch)
		}
		return nil
	})
	runErr := r.Run(ctx)
	detected := time.Now()
	if err := shouldTakeOver(runErr, r.HandedOver(), latest != nil); err != nil {
		rep.close()
		if ctx.Err() != nil {
			return nil, Takeover{}, ctx.Err()
		}
		sb.setListening(err.Error())
		return nil, Takeover{}, err
	}
	tk := Takeover{Epoch: latestEpoch, Cause: runErr}
	fence, claimed, err := sb.takeGeneration(ctx, r.Peer(), rep)
	tk.Fence, tk.Claim = fence, claimed
	if err != nil {
		rep.close()
		if ctx.Err() != nil {
			return nil, Takeover{}, ctx.Err()
		}
		sb.setListening(err.Error())
		return nil, Takeover{}, err
	}
	if err := sb.start(rep.Machine, latest, rep.NICs); err != nil {
		rep.close()
		if fence != nil {
			fence.Close()
		}
		return nil, tk, fmt.Errorf("standby: resume replica at epoch %d: %w", latestEpoch, err)
	}
	sb.setRunning(fence)
	tk.Took = time.Since(detected)
	return rep.Machine, tk, nil
}

// start runs the guest here from st and tells the network where its MACs
// now live.
func (sb *Standby) start(m *vmm.Machine, st *vmm.MachineState, nics []NIC) error {
	if sb.beforeStart != nil {
		if err := sb.beforeStart(m, st); err != nil {
			return err
		}
	}
	if err := m.StartFrom(st); err != nil {
		return err
	}
	Announce(nics)
	return nil
}
