package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"govmm/ctlapi"
	"govmm/kvmapi"
	"govmm/replicate"
	"govmm/vmm"
)

// serveAPI starts the control API when --api-sock is set and returns a
// function that stops it.
func serveAPI(m *vmm.Machine, f *runFlags) (*vmBackend, func(), error) {
	be := &vmBackend{m: m, f: f, name: f.name, started: time.Now(), role: f.role}
	if f.apiSock == "" {
		return be, func() {}, nil
	}
	s, err := ctlapi.Serve(context.Background(), f.apiSock, be)
	if err != nil {
		return nil, nil, fmt.Errorf("--api-sock: %w", err)
	}
	return be, func() { _ = s.Close() }, nil
}

// vmBackend is the control API's view of a running machine.
type vmBackend struct {
	m       *vmm.Machine
	f       *runFlags
	name    string
	started time.Time
	rep     atomic.Pointer[replicate.Replicator]

	mu         sync.Mutex
	userPaused bool
	role       string // "primary" or "standby (took over)"
}

var _ ctlapi.Backend = (*vmBackend)(nil)

func (b *vmBackend) Info() ctlapi.Info {
	state := "running"
	if b.m.Paused() {
		state = "paused"
	}
	cfg := b.m.Config()
	info := ctlapi.Info{Name: b.name, State: state, VCPUs: cfg.CPUs, MemoryBytes: cfg.MemSize,
		Devices: b.m.Devices(), Uptime: time.Since(b.started), Role: b.role}
	if r := b.rep.Load(); r != nil {
		info.Peer = b.f.replicateTo
		if r.Stats().Protected {
			info.Role = "primary (protected)"
		} else {
			info.Role = "primary (UNPROTECTED)"
		}
	}
	return info
}

// Pause holds one pause on behalf of the operator; a second pause is a
// conflict, so checkpoints' own pauses never get mixed up with it.
func (b *vmBackend) Pause() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.userPaused {
		return fmt.Errorf("pause: %w: already paused", ctlapi.ErrConflict)
	}
	if err := b.m.Pause(); err != nil {
		return err
	}
	b.userPaused = true
	return nil
}

func (b *vmBackend) Resume() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.userPaused {
		return fmt.Errorf("resume: %w: not paused", ctlapi.ErrConflict)
	}
	if err := b.m.Resume(); err != nil {
		return err
	}
	b.userPaused = false
	return nil
}

func (b *vmBackend) Snapshot(ctx context.Context, path string) (ctlapi.SnapshotResult, error) {
	r, err := b.m.Snapshot(ctx, path)
	if err != nil {
		return ctlapi.SnapshotResult{}, err
	}
	return ctlapi.SnapshotResult{Path: path, Bytes: uint64(r.Bytes), Pages: r.Pages, ZeroPages: r.ZeroPages, Pause: r.Paused}, nil
}

func (b *vmBackend) Migrate(ctx context.Context, to string, progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	return migrate(ctx, b.m, b.f, to, progress)
}

func (b *vmBackend) Stats() ctlapi.Stats {
	var s ctlapi.Stats
	add := func(name, help, typ string, v float64, labels map[string]string) {
		s.Metrics = append(s.Metrics, ctlapi.Metric{Name: name, Help: help, Type: typ, Value: v, Labels: labels})
	}
	if exits, ok := b.m.KVMExits(); ok {
		for id, n := range exits {
			add("govmm_vcpu_exits_total", "VM exits of the vCPU, as KVM counts them (those KVM handles itself included)", "counter", float64(n),
				map[string]string{"vcpu": strconv.Itoa(id)})
		}
	}
	counts := b.m.ExitCounts()
	for _, r := range []kvmapi.ExitReason{kvmapi.ExitIO, kvmapi.ExitMMIO} {
		counts[r] += 0 // always present, so the family exists
	}
	for reason, n := range counts {
		add("govmm_vcpu_userspace_exits_total", "vCPU exits that KVM handed to govmm, by reason", "counter", float64(n),
			map[string]string{"reason": kvmapi.ExitReason(reason).String()})
	}
	add("govmm_pio_unclaimed_total", "port I/O accesses no device claimed", "counter", float64(b.m.PIOBus().Unclaimed.Load()), nil)
	add("govmm_mmio_unclaimed_total", "MMIO accesses no device claimed", "counter", float64(b.m.MMIOBus().Unclaimed.Load()), nil)
	paused := 0.0
	if b.m.Paused() {
		paused = 1
	}
	add("govmm_paused", "1 while the vCPUs are paused", "gauge", paused, nil)
	add("govmm_uptime_seconds", "seconds since the VMM started the guest", "gauge", time.Since(b.started).Seconds(), nil)
	if r := b.rep.Load(); r != nil {
		rs := r.Stats()
		prot := 0.0
		if rs.Protected {
			prot = 1
		}
		add("govmm_replication_protected", "1 while a standby holds a current checkpoint; 0 means the guest runs UNPROTECTED", "gauge", prot, nil)
		add("govmm_replication_epoch", "last checkpoint taken", "gauge", float64(rs.Epoch), nil)
		add("govmm_replication_acked_epoch", "last checkpoint the standby acknowledged", "gauge", float64(rs.Acked), nil)
		add("govmm_replication_epochs_total", "checkpoints taken", "counter", float64(rs.Epochs), nil)
		add("govmm_replication_dirty_pages_total", "pages shipped in checkpoints", "counter", float64(rs.DirtyPages), nil)
		add("govmm_replication_bytes_total", "bytes sent in checkpoints", "counter", float64(rs.Bytes), nil)
		add("govmm_replication_pause_seconds_total", "time the guest was paused for checkpoints", "counter", rs.PauseSum.Seconds(), nil)
		add("govmm_replication_ack_seconds_total", "sum of resume-to-ack times", "counter", rs.AckSum.Seconds(), nil)
		for q, v := range map[string]time.Duration{"0.5": rs.PauseP50, "0.99": rs.PauseP99, "1": rs.PauseMax} {
			add("govmm_replication_pause_seconds", "checkpoint pause over the last 1024 epochs", "gauge", v.Seconds(), map[string]string{"quantile": q})
		}
		l := rs.Last
		add("govmm_replication_last_pause_seconds", "pause of the last checkpoint", "gauge", l.Pause.Seconds(), nil)
		add("govmm_replication_last_dirty_pages", "dirty pages in the last checkpoint", "gauge", float64(l.DirtyPages), nil)
		add("govmm_replication_last_bytes", "bytes of the last checkpoint", "gauge", float64(l.Bytes), nil)
		add("govmm_replication_last_epoch_seconds", "length of the last epoch", "gauge", l.Length.Seconds(), nil)
		var held, heldBytes int
		for _, n := range b.f.nics {
			st := n.out.Stats()
			held += st.HeldFrames
			heldBytes += st.HeldBytes
		}
		add("govmm_output_held_packets", "guest packets held until their checkpoint is acknowledged", "gauge", float64(held), nil)
		add("govmm_output_held_bytes", "guest bytes held until their checkpoint is acknowledged", "gauge", float64(heldBytes), nil)
	}
	return s
}

var _ ctlapi.ReplicationBackend = (*vmBackend)(nil)

// StartReplication protects the running VM (PUT /vm/replicate).
func (b *vmBackend) StartReplication(ctx context.Context, req ctlapi.ReplicateRequest) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if r := b.rep.Load(); r != nil {
		select {
		case <-r.Done():
		default:
			return fmt.Errorf("replicate: %w: already replicating to %s", ctlapi.ErrConflict, b.f.replicateTo)
		}
	}
	if req.Epoch != "" {
		d, err := time.ParseDuration(req.Epoch)
		if err != nil || d <= 0 {
			return fmt.Errorf("replicate: %w: bad epoch %q", ctlapi.ErrInvalid, req.Epoch)
		}
		b.f.epoch = d
	}
	b.f.replicateTo = req.To
	rep, err := startReplication(b.m, b.f)
	if err != nil {
		return err
	}
	b.rep.Store(rep)
	return nil
}

// StopReplication ends replication (PUT /vm/replicate/stop).
func (b *vmBackend) StopReplication() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	r := b.rep.Load()
	if r == nil {
		return fmt.Errorf("unreplicate: %w: not replicating", ctlapi.ErrConflict)
	}
	r.Stop()
	b.rep.Store(nil)
	return nil
}
