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
// authentication, which is allowed only towards loopback.
func streamKey(keyFile, addr string) (key []byte, insecure bool, err error) {
	if keyFile != "" {
		key, err = stream.LoadKey(keyFile)
		return key, false, err
	}
	if err := stream.CheckListenAddr(addr, false); err != nil {
		return nil, false, fmt.Errorf("%w (pass --key-file to use a pre-shared key)", err)
	}
	return nil, true, nil
}

// migrate moves the running machine to a standby (the control API's
// PUT /vm/migrate).
func migrate(ctx context.Context, m *vmm.Machine, f *runFlags, to string, progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	if _, _, err := net.SplitHostPort(to); err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate to %q: %w: want HOST:PORT", to, ctlapi.ErrInvalid)
	}
	key, insecure, err := streamKey(f.keyFile, to)
	if err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate: %w: %w", ctlapi.ErrInvalid, err)
	}
	r, err := replicate.Migrate(ctx, m, replicate.MigrateConfig{To: to, Name: f.name, Key: key, Insecure: insecure, Disks: f.diskLogs,
		Progress: func(p replicate.Progress) {
			progress(ctlapi.Progress{Round: p.Round, Phase: p.Phase, BytesSent: p.BytesSent,
				DirtyPages: p.DirtyPages, RemainingPages: p.RemainingPages})
		}})
	if err != nil {
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
		BytesSent: r.BytesSent, PagesSent: r.PagesSent}, nil
}

const standbyUsage = `Usage: govmm standby --listen HOST:PORT [flags]

Keeps a hot replica of a VM replicated to it ('govmm run --replicate-to
HOST:PORT'), and runs it from the last checkpoint when the primary is lost
(no frame within --failover-timeout), announcing the guest's MAC with RARP
and gratuitous ARP. Also receives a live migration ('govmm ctl migrate
--to HOST:PORT') and runs the guest. With --replicate-to, the guest it took
over is protected again by a new standby there (after a full resync). It
uses this host's devices:
give the same device flags as the source (--disk with this host's copy,
--net, --mac). Without --key-file the stream is unauthenticated and only a
loopback address may be used.

Flags:
`

func cmdStandby(args []string) error {
	var f runFlags
	fs := newFlagSet("standby", standbyUsage)
	f.registerDevices(fs)
	f.registerReplication(fs)
	listen := fs.String("listen", "", "address to listen on for the source, HOST:PORT")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *listen == "" {
		return errors.New("standby: --listen HOST:PORT is required")
	}
	key, insecure, err := streamKey(f.keyFile, *listen)
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	var owned []func()
	defer func() {
		for _, c := range owned {
			c()
		}
	}()
	// The standby applies each checkpoint's disk writes to its own copies.
	var diskFiles []*os.File
	for _, s := range f.disks {
		d, err := parseDisk(s)
		if err != nil {
			return err
		}
		df, err := os.OpenFile(d.path, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("--disk %s: %w", d.path, err)
		}
		defer df.Close()
		diskFiles = append(diskFiles, df)
	}
	sb, err := replicate.NewStandby(replicate.StandbyConfig{
		Listen: *listen, Key: key, Insecure: insecure, Disks: diskFiles,
		Build: func(id stream.Identity) (*vmm.Machine, error) {
			nics, disks, _, err := f.devices()
			if err != nil {
				return nil, err
			}
			m, devs, err := newMachine(vmm.Config{MemSize: replicate.MemSize(id), CPUs: int(id.VCPUs)}, &f, nics, disks)
			if err != nil {
				return nil, err
			}
			owned = append(owned, func() { closeAll(devs) })
			return m, nil
		},
		OnRefused: func(err error) { fmt.Fprintf(os.Stderr, "govmm: standby: refused a connection: %v\n", err) },
	})
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	defer sb.Close()
	fmt.Fprintf(os.Stderr, "govmm: standby: listening on %s\n", sb.Addr())
	m, tk, err := sb.ReceiveReplication(context.Background(), f.failoverTimeout)
	if err != nil {
		return err
	}
	defer m.Close()
	if tk.Cause != nil {
		fmt.Fprintf(os.Stderr, "govmm: standby: primary lost (%v); took over at checkpoint %d in %v\n", tk.Cause, tk.Epoch, tk.Took)
		f.role = fmt.Sprintf("former standby, took over at checkpoint %d", tk.Epoch)
	} else {
		fmt.Fprintf(os.Stderr, "govmm: standby: migration received; running the guest\n")
	}
	announce(f.nics, f.guestIP)
	return supervise(m, &f)
}

// startReplication protects the running machine with a standby at
// --replicate-to: the initial sync, then an epoch loop in the background.
// Output commit covers every NIC.
func startReplication(m *vmm.Machine, f *runFlags) (*replicate.Replicator, error) {
	var key []byte
	insecure := true
	if f.replicateTo != replicate.NullStandby {
		var err error
		if key, insecure, err = streamKey(f.keyFile, f.replicateTo); err != nil {
			return nil, fmt.Errorf("--replicate-to: %w", err)
		}
	} else {
		fmt.Fprintln(os.Stderr, "govmm: warning: --replicate-to null: checkpoints go nowhere; the guest is NOT protected (benchmarks only)")
	}
	var outs []*replicate.OutputBuffer
	for _, n := range f.nics {
		if f.unsafeNoOutputBuffering {
			n.out.SetBypass(true)
		}
		outs = append(outs, n.out)
	}
	if f.unsafeNoOutputBuffering {
		fmt.Fprintln(os.Stderr, "govmm: warning: --unsafe-no-output-buffering: clients may see output that a failover forgets (benchmarks only)")
	}
	fmt.Fprintf(os.Stderr, "govmm: replicating to %s: initial sync\n", f.replicateTo)
	rep, err := replicate.StartReplication(context.Background(), m, replicate.ReplicateConfig{
		To: f.replicateTo, Name: f.name, Key: key, Insecure: insecure, Epoch: f.epoch,
		FailoverTimeout: f.failoverTimeout, OnStandbyLoss: f.onStandbyLoss, Outputs: outs, Disks: f.diskLogs})
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "govmm: protected by %s (epoch %v)\n", f.replicateTo, f.epoch)
	go func() {
		<-rep.Done()
		if err := rep.Err(); err != nil {
			fmt.Fprintf(os.Stderr, "govmm: %v\n", err)
		}
	}()
	return rep, nil
}
