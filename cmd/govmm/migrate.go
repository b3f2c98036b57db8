package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"govmm/ctlapi"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
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
func migrate(ctx context.Context, m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node, to string,
	progress func(ctlapi.Progress)) (ctlapi.MigrateResult, error) {
	if _, _, err := net.SplitHostPort(to); err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate to %q: %w: want HOST:PORT", to, ctlapi.ErrInvalid)
	}
	key, insecure, err := streamKey(f.keyFile, to)
	if err != nil {
		return ctlapi.MigrateResult{}, fmt.Errorf("migrate: %w: %w", ctlapi.ErrInvalid, err)
	}
	r, err := node.Migrate(ctx, m, replicate.MigrateConfig{To: to, Name: f.name, Key: key, Insecure: insecure,
		Disks: devs.diskLogs, Devices: devs.attrs,
		Progress: func(p replicate.Progress) {
			progress(ctlapi.Progress{Round: p.Round, Phase: p.Phase, BytesSent: p.BytesSent,
				DirtyPages: p.DirtyPages, RemainingPages: p.RemainingPages})
		}})
	switch {
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
		BytesSent: r.BytesSent, PagesSent: r.PagesSent}, nil
}

const standbyUsage = `Usage: govmm standby --listen HOST:PORT [flags]

Keeps a hot replica of a VM replicated to it ('govmm run --replicate-to
HOST:PORT'), and runs it from the last checkpoint when the primary is lost
(nothing heard for --failover-timeout while listening, or its connection
gone without a goodbye), announcing the guest's MAC with RARP and
gratuitous ARP. Also receives a live migration ('govmm ctl migrate --to
HOST:PORT') and runs the guest once the source hands it over.

Give the same device flags as the source, with this host's resources:
--disk with this host's copy (a file or a block device of the same size;
the initial sync copies the source's disk into it), --net of the same kind
(user or tap), the same --mac or --name. A primary whose guest this standby
could not run (another device set, MAC, disk size, read-only flag or
network backend) is refused at the handshake, and both ends say why.
Connections that are no usable primary are refused and logged; the
standby keeps listening. With --replicate-to, the guest it took over is
protected again by a new standby there; if that fails, the guest keeps
running, unprotected, and the standby says so.

The two ends use the larger of their --failover-timeout values (default
2s, for a LAN; see 'govmm help run' for other links). Without --key-file
the stream is unauthenticated and only a loopback address may be used.

With --witness HOST:PORT (the primary's witness; the same --key-file and
--name) the standby takes over only after winning the next generation of
the VM there. Cut off from the witness it does not take over: it keeps
its replica, says why (log, 'govmm ctl info' on --api-sock, which serves
while standing by too) and keeps claiming. It does not take over either
when the witness says that the primary is alive (it renews its lease) or
moved on without it (a newer generation). A primary with a witness is
refused by a standby without one, and the other way round.

Flags:
`

func cmdStandby(args []string) error {
	var f runFlags
	fs := newFlagSet("standby", standbyUsage)
	f.registerDevices(fs)
	f.registerReplication(fs)
	fs.StringVar(&f.guestIP, "guest-ip", "", "the guest's eth0 address ADDR/PREFIX, announced by gratuitous ARP when the guest runs here")
	refuseFlags(fs, "does not apply to standby: the guest's kernel, memory, vCPUs and settings come from the primary",
		"kernel", "initrd", "cmdline", "mem", "cpus", "guest-gw")
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
	// The standby copies the source's disks into its own copies (files or
	// block devices of the same sizes), then applies each checkpoint's
	// writes to them.
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
	var wc *witness.Client
	if f.witness != "" {
		if wc, err = newWitnessClient(&f, "standby", *listen); err != nil {
			return fmt.Errorf("standby: %w", err)
		}
		defer wc.Close()
		checkWitnessAtStart(wc)
	}
	var mu sync.Mutex
	built := map[*vmm.Machine]*machineDevices{} // the replicas built, until discarded
	sb, err := replicate.NewStandby(replicate.StandbyConfig{
		Listen: *listen, Key: key, Insecure: insecure, Disks: diskFiles, FailoverTimeout: f.failoverTimeout, Witness: wc,
		Build: func(id stream.Identity) (replicate.Replica, error) {
			nics, disks, _, err := f.devices()
			if err != nil {
				return replicate.Replica{}, err
			}
			m, d, err := newMachine(vmm.Config{MemSize: replicate.MemSize(id), CPUs: int(id.VCPUs)}, &f, nics, disks)
			if err != nil {
				return replicate.Replica{}, err
			}
			mu.Lock()
			built[m] = d
			mu.Unlock()
			return replicate.Replica{Machine: m, NICs: d.nics, Devices: d.attrs, Disks: d.diskLogs, Close: func() {
				mu.Lock()
				delete(built, m)
				mu.Unlock()
				d.Close()
				m.Close()
			}}, nil
		},
		OnRefused: func(err error) { fmt.Fprintf(os.Stderr, "govmm: standby: refused: %v\n", err) },
	})
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	defer sb.Close()
	// Standing by, the control API says what this standby knows (whether
	// a failover would be possible, and why not); once the guest runs
	// here, supervise serves it instead.
	stopAPI, err := serveStandbyAPI(sb, &f)
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	fmt.Fprintf(os.Stderr, "govmm: standby: listening on %s\n", sb.Addr())
	m, tk, err := sb.ReceiveReplication(context.Background())
	stopAPI()
	if err != nil {
		return err
	}
	mu.Lock()
	devs := built[m]
	mu.Unlock()
	defer m.Close()
	defer devs.Close()
	if tk.Fence != nil {
		defer tk.Fence.Close()
	}
	origin := replicate.Migrated
	won := ""
	if tk.Fence != nil {
		won = fmt.Sprintf(" (won generation %d at the witness in %v)", tk.Fence.Generation(), tk.Claim.Round(time.Millisecond))
	}
	if tk.Cause != nil {
		fmt.Fprintf(os.Stderr, "govmm: standby: primary lost (%v); took over at checkpoint %d in %v%s\n", tk.Cause, tk.Epoch, tk.Took, won)
		origin = replicate.TookOver
	} else {
		fmt.Fprintf(os.Stderr, "govmm: standby: migration received; running the guest%s\n", won)
	}
	return supervise(m, &f, devs, replicate.NewNode(origin, tk, tk.Fence))
}

// checkWitnessAtStart asks the witness once, briefly, and says loudly if
// it does not answer: failover is impossible until it does (the standby
// keeps asking, and listens anyway).
func checkWitnessAtStart(wc *witness.Client) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	rec, err := wc.Query(ctx)
	var ref *witness.Refusal
	switch {
	case err == nil:
		fmt.Fprintf(os.Stderr, "govmm: standby: witness %s answers: %v\n", wc.Addr(), rec)
	case errors.As(err, &ref):
		fmt.Fprintf(os.Stderr, "govmm: standby: witness %s answers (%v)\n", wc.Addr(), err)
	default:
		fmt.Fprintf(os.Stderr, "govmm: standby: WARNING: witness %s does not answer (%v): FAILOVER IMPOSSIBLE until it does; listening anyway\n", wc.Addr(), err)
	}
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
// epoch loop in the background. Output commit covers every NIC.
func startReplication(m *vmm.Machine, f *runFlags, devs *machineDevices, node *replicate.Node, to string, epoch time.Duration) error {
	cfg := replicate.ReplicateConfig{To: to, Name: f.name, Epoch: epoch, FailoverTimeout: f.failoverTimeout,
		OnStandbyLoss: f.onStandbyLoss, Disks: devs.diskLogs, Devices: devs.attrs}
	if node.Fence() == nil && !f.nullStandby {
		warnSplitBrain()
	}
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
		if cfg.Key, cfg.Insecure, err = streamKey(f.keyFile, to); err != nil {
			return fmt.Errorf("--replicate-to: %w", err)
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
	fmt.Fprintf(os.Stderr, "govmm: replicating to %s: initial sync\n", to)
	rep, err := node.Protect(context.Background(), m, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "govmm: protected by %s (epoch %v)\n", to, epoch)
	go func() {
		<-rep.Done()
		if err := rep.Err(); err != nil {
			fmt.Fprintf(os.Stderr, "govmm: %v\n", err)
		}
	}()
	return nil
}
