package main

import (
	"context"
	"fmt"
	"time"

	"govmm/ctlapi"
	"govmm/kvmapi"
	"govmm/vmm"
)

// serveAPI starts the control API when --api-sock is set and returns a
// function that stops it.
func serveAPI(m *vmm.Machine, f *runFlags) (stop func(), err error) {
	if f.apiSock == "" {
		return func() {}, nil
	}
	s, err := ctlapi.Serve(context.Background(), f.apiSock, &vmBackend{m: m, f: f, name: f.name, started: time.Now()})
	if err != nil {
		return nil, fmt.Errorf("--api-sock: %w", err)
	}
	return func() { _ = s.Close() }, nil
}

// vmBackend is the control API's view of a running machine.
type vmBackend struct {
	m       *vmm.Machine
	f       *runFlags
	name    string
	started time.Time
}

var _ ctlapi.Backend = (*vmBackend)(nil)

func (b *vmBackend) Info() ctlapi.Info {
	state := "running"
	if b.m.Paused() {
		state = "paused"
	}
	cfg := b.m.Config()
	return ctlapi.Info{Name: b.name, State: state, VCPUs: cfg.CPUs, MemoryBytes: cfg.MemSize,
		Devices: b.m.Devices(), Uptime: time.Since(b.started)}
}

func (b *vmBackend) Pause() error  { return b.m.Pause() }
func (b *vmBackend) Resume() error { return b.m.Resume() }

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
	counts := b.m.ExitCounts()
	for _, r := range []kvmapi.ExitReason{kvmapi.ExitIO, kvmapi.ExitMMIO} {
		counts[r] += 0 // always present, so the family exists
	}
	for reason, n := range counts {
		add("govmm_vcpu_exits_total", "vCPU exits to userspace by reason", "counter", float64(n),
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
	return s
}
