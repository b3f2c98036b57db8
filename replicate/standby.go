package replicate

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"govmm/replicate/stream"
	"govmm/vmm"
)

// Standby is the receiving end of replication and of live migration: it
// listens, accepts the source (refusing strangers), builds the machine
// the source describes, and writes every checkpoint into its memory. A
// replica becomes the running guest when its primary is lost (failover);
// a migrated guest runs once the source has handed over.
type Standby struct {
	ln   *stream.Listener
	sink *stream.StagingSink
	cfg  StandbyConfig

	// Test seams (see export_test.go); nil in production.
	// beforeStart sees the machine with the memory and state it is about
	// to start from; onCheckpoint is told of each committed resumable
	// checkpoint.
	beforeStart  func(m *vmm.Machine, st *vmm.MachineState) error
	onCheckpoint func(epoch uint64)
}

// StandbyConfig configures a standby or migration destination.
type StandbyConfig struct {
	Listen   string
	Key      []byte
	Insecure bool
	// Build creates the machine (devices attached, not started) for the
	// source's identity, and returns its NICs, which a takeover announces.
	Build func(id stream.Identity) (*vmm.Machine, []NIC, error)
	// OnRefused is told about connections refused at the handshake.
	OnRefused func(err error)
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
func (sb *Standby) accept(ctx context.Context) (*stream.Receiver, *vmm.Machine, []NIC, error) {
	for {
		r, err := sb.ln.Accept(ctx)
		if err != nil {
			if errors.Is(err, stream.ErrAuth) || errors.Is(err, stream.ErrMismatch) || errors.Is(err, stream.ErrVersion) {
				if sb.cfg.OnRefused != nil {
					sb.cfg.OnRefused(err)
				}
				continue
			}
			return nil, nil, nil, err
		}
		m, nics, err := sb.cfg.Build(r.Peer())
		if err != nil {
			r.Close()
			return nil, nil, nil, fmt.Errorf("standby: build machine for %s: %w", r.Peer().Name, err)
		}
		if err := checkShape(m, r.Peer()); err != nil {
			m.Close()
			r.Close()
			return nil, nil, nil, fmt.Errorf("standby: %w", err)
		}
		sb.sink.Dest = m.Memory()
		return r, m, nics, nil
	}
}

// ReceiveMigration waits for a source and returns the running migrated
// machine, its MAC announced. A stream that fails midway leaves nothing
// running.
func (sb *Standby) ReceiveMigration(ctx context.Context) (*vmm.Machine, error) {
	r, m, nics, err := sb.accept(ctx)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var final *vmm.MachineState
	// The final checkpoint's state is decoded before it commits: a state
	// that does not decode is refused and the source keeps the guest.
	r.SetOnCommit(func(c *stream.Checkpoint) error {
		if c.Kind != stream.KindFinal {
			return nil
		}
		st, err := applyCheckpoint(sb.cfg.Disks, c.State)
		if err != nil {
			return err
		}
		final = st
		return nil
	})
	if err := r.Run(ctx); err != nil {
		m.Close()
		return nil, fmt.Errorf("standby: migration stream: %w", err)
	}
	if !r.HandedOver() || final == nil {
		m.Close()
		return nil, errors.New("standby: the source ended the stream without handing over")
	}
	if err := sb.start(m, final, nics); err != nil {
		m.Close()
		return nil, fmt.Errorf("standby: start migrated guest: %w", err)
	}
	return m, nil
}

// ReceiveReplication keeps a replica of the primary's guest: every
// committed epoch checkpoint is applied to this machine's memory (staged
// until its commit, so a partial checkpoint never lands) and its state
// kept. When the primary is lost (no frame within the failure timeout, or
// the stream breaks), the replica becomes the running guest from the last
// committed checkpoint, with no copy of memory, its MAC is announced, and
// the machine is returned. A deliberate goodbye from the primary
// (replication stopped) returns an error and nothing runs; a migration's
// handover runs the guest.
func (sb *Standby) ReceiveReplication(ctx context.Context, failoverTimeout time.Duration) (*vmm.Machine, Takeover, error) {
	var tk Takeover
	if failoverTimeout <= 0 {
		failoverTimeout = 500 * time.Millisecond
	}
	sb.ln.SetFailoverTimeout(failoverTimeout)
	r, m, nics, err := sb.accept(ctx)
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
		st, err := applyCheckpoint(sb.cfg.Disks, c.State)
		if err != nil {
			return err
		}
		latest, latestEpoch = st, c.Epoch
		if sb.onCheckpoint != nil {
			sb.onCheckpoint(c.Epoch)
		}
		return nil
	})
	runErr := r.Run(ctx)
	detected := time.Now()
	if err := shouldTakeOver(runErr, r.HandedOver(), latest != nil); err != nil {
		m.Close()
		return nil, tk, err
	}
	tk = Takeover{Epoch: latestEpoch, Cause: runErr}
	if err := sb.start(m, latest, nics); err != nil {
		m.Close()
		return nil, tk, fmt.Errorf("standby: resume replica at epoch %d: %w", latestEpoch, err)
	}
	tk.Took = time.Since(detected)
	return m, tk, nil
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
