package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"govmm/ctlapi"
	"govmm/kvmapi"
	"govmm/replicate"
	"govmm/vmm"
)

// endpoints serve the control API (--api-sock) and the metrics
// (--metrics-listen) of whichever backend is current: a standby's while it
// stands by, then the VM's once the guest runs there, on the same socket
// and port throughout, so an operator watching a standby keeps watching
// across its takeover.
type endpoints struct {
	live    liveBackend
	api     *ctlapi.Server        // nil without --api-sock
	metrics *ctlapi.MetricsServer // nil without --metrics-listen
}

// serveEndpoints starts what f asks for, serving b.
func serveEndpoints(f *runFlags, b ctlapi.Backend) (*endpoints, error) {
	ep := &endpoints{}
	ep.live.set(b)
	if f.apiSock != "" {
		s, err := ctlapi.Serve(context.Background(), f.apiSock, &ep.live)
		if err != nil {
			err = fmt.Errorf("--api-sock: %w", err)
			if f.apiSockDefault != "" {
				err = fmt.Errorf("%w (%s)", err, f.apiSockDefault)
			}
			return nil, err
		}
		ep.api = s
	}
	if f.metricsListen != "" {
		s, err := ctlapi.ServeMetrics(f.metricsListen, ep.live.Stats)
		if err != nil {
			ep.Close()
			return nil, fmt.Errorf("--metrics-listen %s: %w", f.metricsListen, err)
		}
		ep.metrics = s
	}
	return ep, nil
}

// Close stops serving. It is idempotent.
func (ep *endpoints) Close() {
	if ep.api != nil {
		_ = ep.api.Close()
	}
	if ep.metrics != nil {
		_ = ep.metrics.Close()
	}
}

// liveBackend forwards every call to the backend current at that moment.
type liveBackend struct {
	mu sync.RWMutex // guards b
	b  ctlapi.Backend
}

var (
	_ ctlapi.Backend            = (*liveBackend)(nil)
	_ ctlapi.ReplicationBackend = (*liveBackend)(nil)
)

func (l *liveBackend) set(b ctlapi.Backend) {
	l.mu.Lock()
	l.b = b
	l.mu.Unlock()
}

func (l *liveBackend) get() ctlapi.Backend {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.b
}

func (l *liveBackend) Info() ctlapi.Info { return l.get().Info() }
func (l *liveBackend) Pause() error      { return l.get().Pause() }
func (l *liveBackend) Resume() error     { return l.get().Resume() }

// Stats are the current backend's, with the figures derived from them.
func (l *liveBackend) Stats() ctlapi.Stats {
	s := l.get().Stats()
	s.Derived = deriveStats(s.Metrics)
	return s
}

func (l *liveBackend) Snapshot(ctx context.Context, path string) (ctlapi.SnapshotResult, error) {
	return l.get().Snapshot(ctx, path)
}

func (l *liveBackend) Migrate(ctx context.Context, req ctlapi.MigrateRequest, progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	return l.get().Migrate(ctx, req, progress)
}

func (l *liveBackend) StartReplication(ctx context.Context, req ctlapi.ReplicateRequest, progress func(ctlapi.Progress)) error {
	if rb, ok := l.get().(ctlapi.ReplicationBackend); ok {
		return rb.StartReplication(ctx, req, progress)
	}
	return fmt.Errorf("%w: this VMM cannot replicate", ctlapi.ErrNotSupported)
}

func (l *liveBackend) StopReplication() error {
	if rb, ok := l.get().(ctlapi.ReplicationBackend); ok {
		return rb.StopReplication()
	}
	return fmt.Errorf("%w: this VMM cannot replicate", ctlapi.ErrNotSupported)
}

// vmBackend is the control API's view of a running machine.
type vmBackend struct {
	m       *vmm.Machine
	f       *runFlags // as given on the command line; never written
	devs    *machineDevices
	node    *replicate.Node
	started time.Time

	mu         sync.Mutex // guards userPaused
	userPaused bool
}

var _ ctlapi.Backend = (*vmBackend)(nil)

func (b *vmBackend) Info() ctlapi.Info {
	state := "running"
	switch {
	case b.fenced() != nil:
		state = "fenced"
	case b.m.Paused():
		state = "paused"
	}
	cfg := b.m.Config()
	return ctlapi.Info{Name: b.f.name, State: state, VCPUs: cfg.CPUs, MemoryBytes: cfg.MemSize,
		Devices: b.m.Devices(), Uptime: time.Since(b.started), Role: b.node.Describe(), Peer: b.node.Peer(),
		Fencing: b.node.Fencing()}
}

// fenced is why this VMM is fenced, or nil.
func (b *vmBackend) fenced() error {
	if f := b.node.Fence(); f != nil {
		return f.Err()
	}
	return nil
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
	if err := b.fenced(); err != nil {
		return fmt.Errorf("resume: %w: this VMM is fenced, its guest never runs here again: %w", ctlapi.ErrConflict, err)
	}
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
	r, err := b.m.Snapshot(ctx, path, b.f.snapshotConfig())
	if err != nil {
		return ctlapi.SnapshotResult{}, err
	}
	return ctlapi.SnapshotResult{Path: path, Bytes: uint64(r.Bytes), Pages: r.Pages, ZeroPages: r.ZeroPages, Pause: r.Paused}, nil
}

func (b *vmBackend) Migrate(ctx context.Context, req ctlapi.MigrateRequest, progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	return migrate(ctx, b.m, b.f, b.devs, b.node, req, progress)
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
	if events, ok := b.m.KVMEvents(); ok {
		for id, byName := range events {
			for _, name := range vmm.KVMEventNames {
				if n, ok := byName[name]; ok {
					add("govmm_vcpu_kvm_events_total", "events KVM counts for the vCPU, by its statistic's name: exits it handled itself by kind (halt_exits, irq_window_exits...), interrupts injected", "counter", float64(n),
						map[string]string{"vcpu": strconv.Itoa(id), "event": name})
				}
			}
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
	for _, m := range b.node.Metrics() {
		s.Metrics = append(s.Metrics, ctlapi.Metric(m))
	}
	return s
}

var _ ctlapi.ReplicationBackend = (*vmBackend)(nil)

// StartReplication protects the running VM (PUT /vm/replicate).
func (b *vmBackend) StartReplication(ctx context.Context, req ctlapi.ReplicateRequest, progress func(ctlapi.Progress)) error {
	epoch := b.f.epoch
	if req.Epoch != "" {
		d, err := parseEpoch(req.Epoch)
		if err != nil {
			return fmt.Errorf("replicate: %w: epoch %q: %w", ctlapi.ErrInvalid, req.Epoch, err)
		}
		epoch = d
	}
	maxEpoch := b.f.epochMax
	if req.EpochMax != "" {
		d, err := parseMaxEpoch(req.EpochMax)
		if err != nil {
			return fmt.Errorf("replicate: %w: epoch_max %q: %w", ctlapi.ErrInvalid, req.EpochMax, err)
		}
		maxEpoch = d
	}
	if maxEpoch != 0 && maxEpoch < epoch {
		return fmt.Errorf("replicate: %w: epoch_max %v below the epoch %v", ctlapi.ErrInvalid, maxEpoch, epoch)
	}
	err := startReplication(b.m, b.f, b.devs, b.node, req.To, epoch, maxEpoch, func(p replicate.SyncProgress) {
		phase := ctlapi.PhaseSync
		if p.Acking {
			phase = ctlapi.PhaseSyncAck
		}
		progress(ctlapi.Progress{Phase: phase, Round: p.Round, BytesSent: p.Copied, TotalBytes: p.Total})
	})
	if errors.Is(err, replicate.ErrReplicating) {
		return fmt.Errorf("replicate: %w: %w", ctlapi.ErrConflict, err)
	}
	return err
}

// StopReplication ends replication (PUT /vm/replicate/stop).
func (b *vmBackend) StopReplication() error {
	if err := b.node.Unprotect(); err != nil {
		return fmt.Errorf("unreplicate: %w: %w", ctlapi.ErrConflict, err)
	}
	return nil
}

// standbyBackend is the control API of a standby while no guest runs
// there: what it follows and receives, and whether a failover would be
// possible.
type standbyBackend struct {
	sb      *replicate.Standby
	f       *runFlags
	started time.Time
}

var (
	_ ctlapi.Backend            = (*standbyBackend)(nil)
	_ ctlapi.ReplicationBackend = (*standbyBackend)(nil)
)

func (b *standbyBackend) Info() ctlapi.Info {
	st := b.sb.Status()
	// "standing by" until the VM's backend takes over this socket, so
	// that a client that sees another state can use the VM.
	return ctlapi.Info{Name: b.f.name, State: "standing by", Uptime: time.Since(b.started), Role: st.Describe(),
		Peer: st.Peer, Fencing: st.Reason,
		Standby: &ctlapi.StandbyInfo{Phase: st.Phase, Source: st.Source, Checkpoint: st.Epoch, Lag: st.Lag,
			BytesReceived: st.BytesReceived, Witness: st.Witness}}
}

var errStandingBy = fmt.Errorf("%w: standing by: no guest runs here", ctlapi.ErrConflict)

func (b *standbyBackend) Pause() error  { return errStandingBy }
func (b *standbyBackend) Resume() error { return errStandingBy }
func (b *standbyBackend) Snapshot(context.Context, string) (ctlapi.SnapshotResult, error) {
	return ctlapi.SnapshotResult{}, errStandingBy
}
func (b *standbyBackend) Migrate(context.Context, ctlapi.MigrateRequest, func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	return ctlapi.MigrateResult{}, errStandingBy
}
func (b *standbyBackend) StartReplication(context.Context, ctlapi.ReplicateRequest, func(ctlapi.Progress)) error {
	return errStandingBy
}
func (b *standbyBackend) StopReplication() error { return errStandingBy }

func (b *standbyBackend) Stats() ctlapi.Stats {
	var s ctlapi.Stats
	for _, m := range b.sb.Metrics() {
		s.Metrics = append(s.Metrics, ctlapi.Metric(m))
	}
	s.Metrics = append(s.Metrics, ctlapi.Metric{Name: "govmm_uptime_seconds", Help: "seconds since the standby started",
		Type: "gauge", Value: time.Since(b.started).Seconds()})
	return s
}
