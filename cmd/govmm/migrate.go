package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"govmm/ctlapi"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// streamKey loads --key-file; with none, the stream runs without
// authentication, which is allowed only towards loopback. Its errors give
// no hint: each caller says what its user can do.
func streamKey(keyFile, addr string) (key []byte, insecure bool, err error) {
	if keyFile != "" {
		key, err = stream.LoadKey(keyFile)
		return key, false, err
	}
	if err := stream.CheckListenAddr(addr, false); err != nil {
		return nil, false, err
	}
	return nil, true, nil
}

// apiStreamKey is streamKey for the control API's migrate and replicate,
// whose client has no --key-file to give: a VMM without a key says that
// it was started without one.
func apiStreamKey(keyFile, addr string) (key []byte, insecure bool, err error) {
	key, insecure, err = streamKey(keyFile, addr)
	if err != nil && keyFile == "" {
		err = fmt.Errorf("%w; this VMM was started without --key-file", err)
	}
	return key, insecure, err
}

// migrate moves the running machine to a standby (the control API's
// PUT /vm/migrate). A replicated guest is refused unless req.Force: then
// its replication stops first and it runs unprotected at the destination.
func migrate(ctx context.Context, m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node, req ctlapi.MigrateRequest,
	progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	to := req.To
	if _, _, err := net.SplitHostPort(to); err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate to %q: %w: want HOST:PORT", to, ctlapi.ErrInvalid)
	}
	key, insecure, err := apiStreamKey(f.keyFile, to)
	if err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate to %s: %w: %w", to, ctlapi.ErrInvalid, err)
	}
	if req.Force && node.Peer() != "" {
		fmt.Fprintf(os.Stderr, "govmm: migrate --force: stopping replication to %s; the guest runs UNPROTECTED from now on\n", node.Peer())
	}
	r, err := node.Migrate(ctx, m, replicate.MigrateConfig{To: to, Name: f.name, Key: key, Insecure: insecure,
		Compression: f.streamCompress, Deltas: f.streamDeltas, Cipher: f.streamCipher, SendBuffer: f.streamSendBuffer,
		Disks: devs.diskLogs, Devices: devs.attrs,
		Progress: func(p replicate.Progress) {
			progress(ctlapi.Progress{Round: p.Round, Phase: p.Phase, BytesSent: p.BytesSent,
				DirtyPages: p.DirtyPages, RemainingPages: p.RemainingPages})
		}}, req.Force)
	switch {
	case errors.Is(err, replicate.ErrWouldUnprotect):
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate: %w: the guest is protected by the standby at %s and migrating would drop that protection (it would run UNPROTECTED at %s); use --force to migrate anyway",
			ctlapi.ErrConflict, node.Peer(), to)
	case errors.Is(err, replicate.ErrReplicating):
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate: %w: %w", ctlapi.ErrConflict, err)
	case errors.Is(err, replicate.ErrHandoverUnconfirmed):
		// The guest may run at the destination: it stays paused here, and
		// this VMM stays up for an operator to look.
		fmt.Fprintf(os.Stderr, "govmm: %v\n", err)
		return ctlapi.MigrateResult{}, err
	case err != nil:
		return ctlapi.MigrateResult{}, err
	}
	// The guest lives at the destination now; this VMM stops once the
	// result has been sent to the client (the request's context ends).
	go func() {
		select {
		case <-ctx.Done():
		case <-time.After(10 * time.Second):
		}
		m.StopWith(vmm.Result{Status: 0, Reason: "migrated"})
	}()
	return ctlapi.MigrateResult{TotalTime: r.TotalTime, Downtime: r.Downtime, Rounds: r.Rounds,
		BytesSent: r.BytesSent, PagesSent: r.PagesSent, DroppedProtection: r.DroppedProtection}, nil
}

// reprotectFailed is what a VMM that took its guest over (or received it)
// does when protecting it anew fails: it keeps the guest running,
// unprotected, and says so; stopping the guest just taken over would be
// the outage failover exists to prevent.
func reprotectFailed(err error) {
	fmt.Fprintf(os.Stderr, "govmm: ERROR: re-protection failed, the guest runs UNPROTECTED (retry with 'govmm ctl replicate --to HOST:PORT'): %v\n", err)
}

// startReplication protects the running machine with a standby at to
// (or the null standby of --null-standby): the initial sync, then an
// epoch loop in the background. Output commit covers every NIC. The
// initial sync's progress is drawn on stderr, and told to progress too
// if it is not nil (a 'ctl replicate' client).
func startReplication(m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node, to string, epoch, maxEpoch time.Duration,
	progress func(replicate.SyncProgress)) error {
	bar := newTransferBar(os.Stderr, ctlIsTerminal(os.Stderr), "initial sync")
	defer bar.finish()
	cfg := replicate.ReplicateConfig{To: to, Name: f.name, Epoch: epoch, MaxEpoch: maxEpoch, FailoverTimeout: f.failoverTimeout,
		Compression: f.streamCompress, Deltas: f.streamDeltas, Cipher: f.streamCipher, SendBuffer: f.streamSendBuffer, AckSpin: streamSpin(f.ackSpin),
		OnStandbyLoss: f.onStandbyLoss, Copy: replicate.CopyMode(f.checkpointCopy), CoWPages: f.checkpointCoWPages, Disks: devs.diskLogs, Devices: devs.attrs,
		Progress: func(p replicate.SyncProgress) {
			bar.update(p.Copied, p.Total, syncNote(p))
			if progress != nil {
				progress(p)
			}
		}}
	if f.nullStandby {
		if to != "" {
			return fmt.Errorf("--null-standby and a standby address %s: choose one", to)
		}
		fmt.Fprintln(os.Stderr, "govmm: warning: --null-standby: checkpoints go nowhere; the guest is NOT protected (benchmarks only)")
		cfg.Transport = replicate.NewNullTransport()
		to = "the null standby"
	} else {
		if _, _, err := net.SplitHostPort(to); err != nil {
			return fmt.Errorf("replicate to %q: %w: want HOST:PORT", to, ctlapi.ErrInvalid)
		}
		var err error
		// run and standby checked --replicate-to with their flags; this
		// is the control API's replicate.
		if cfg.Key, cfg.Insecure, err = apiStreamKey(f.keyFile, to); err != nil {
			return fmt.Errorf("replicate to %s: %w: %w", to, ctlapi.ErrInvalid, err)
		}
	}
	for _, n := range devs.nics {
		if f.unsafeNoOutputBuffering {
			n.Out.SetBypass(true)
		}
		cfg.Outputs = append(cfg.Outputs, n.Out)
	}
	if f.unsafeNoOutputBuffering {
		fmt.Fprintln(os.Stderr, "govmm: warning: --unsafe-no-output-buffering: clients may see output that a failover forgets (benchmarks only)")
	}
	if node.Fence() == nil && !f.nullStandby {
		warnSplitBrain() // once the request is known to be good
	}
	fmt.Fprintf(os.Stderr, "govmm: replicating to %s: initial sync\n", to)
	_, err := node.Protect(context.Background(), m, cfg)
	bar.finish()
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "govmm: protected by %s (epoch %v)\n", to, epoch)
	// How replication ends (the standby lost, this VMM fenced) the
	// replicate package logs, once.
	return nil
}

// syncNote says which round of the initial sync a progress update is in,
// past the first full copy (whose bar alone says enough).
func syncNote(p replicate.SyncProgress) string {
	switch {
	case p.Acking:
		return "waiting for the standby to apply it and acknowledge"
	case p.Round == 0:
		return "disks"
	case p.Round >= 2:
		return fmt.Sprintf("round %d: pages dirtied meanwhile", p.Round)
	}
	return ""
}
