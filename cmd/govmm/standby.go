package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

const standbyUsage = `Usage: govmm standby --listen HOST:PORT [flags]

Keeps a hot replica of a VM replicated to it ('govmm run --replicate-to
HOST:PORT'), and runs it from the last checkpoint when the primary is lost
(nothing heard for --failover-timeout while listening, or its connection
gone without a goodbye), announcing the guest's MAC with RARP and
gratuitous ARP. Also receives a live migration ('govmm ctl migrate --to
HOST:PORT') and runs the guest once the source hands it over.

--api-sock ('govmm ctl info', 'ctl stats') and --metrics-listen (for
Prometheus) serve from the start what the standby receives (its peer,
last checkpoint, lag, bytes, witness) and, once the guest runs here, the
VM, on the same socket and port.

Give the same device flags as the source, with this host's resources:
--disk with this host's copy (a file or a block device of the same size;
the initial sync copies the source's disk into it, and where the source
reads as zeros, its holes included, punches a hole: a sparse file, e.g.
from 'truncate -s', stays sparse), --net of the same kind (user or tap),
the same --mac or --name. A primary whose guest this standby could not
run (another device set, MAC, disk size, read-only flag or network
backend) is refused at the handshake, and both ends say why.
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
	var readSpin time.Duration
	durationVar(fs, &readSpin, "read-spin", stream.DefaultReadSpin, stream.CheckSpin,
		"inside a checkpoint, poll a drained connection this long for the primary's next bytes before sleeping until they come (a wakeup costs 0.1-0.4 ms on a VM whose idle CPUs halt); the CPU it spends is the standby's; 0 never polls, e.g. for a standby that shares its CPU with other work")
	var listenAddr string
	listen := &listenAddr
	fs.Var(hostPortFlag{listen}, "listen", "address to listen on for the source, `HOST:PORT`")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *listen == "" {
		return usagef("standby", "--listen HOST:PORT is required")
	}
	if fs.NArg() > 0 {
		return usagef("standby", "unexpected argument %q", fs.Arg(0))
	}
	if err := f.check(fs); err != nil {
		return err
	}
	key, insecure, err := streamKey(f.keyFile, *listen)
	if err != nil && f.keyFile == "" {
		return usagef("standby", "--listen %s: %v: give --key-file", *listen, err)
	}
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	disks, keep, err := openStandbyDisks(&f)
	if err != nil {
		return err
	}
	defer closeFiles(disks)
	var wc *witness.Client
	if f.witness != "" {
		if wc, err = newWitnessClient(&f, "standby", *listen); err != nil {
			return fmt.Errorf("standby: %w", err)
		}
		defer wc.Close()
		checkWitnessAtStart(wc)
	}
	reps := &replicas{f: &f, built: map[*vmm.Machine]*machineDevices{}}
	sb, err := replicate.NewStandby(replicate.StandbyConfig{
		Listen: *listen, Key: key, Insecure: insecure, Disks: disks, KeepAllocated: keep, FailoverTimeout: f.failoverTimeout, Witness: wc,
		Compression: f.streamCompress, Deltas: f.streamDeltas, Cipher: f.streamCipher, ReadSpin: streamSpin(readSpin),
		Build:     reps.build,
		OnRefused: func(err error) { fmt.Fprintf(os.Stderr, "govmm: standby: refused: %v\n", err) },
	})
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	defer sb.Close()
	// Standing by, the control API and the metrics say what this standby
	// knows (what it receives, whether a failover would be possible, and
	// why not); once the guest runs here, the same socket and port serve
	// the VM.
	ep, err := serveEndpoints(&f, &standbyBackend{sb: sb, f: &f, started: time.Now()})
	if err != nil {
		return fmt.Errorf("standby: %w", err)
	}
	defer ep.Close()
	fmt.Fprintf(os.Stderr, "govmm: standby: listening on %s\n", sb.Addr())
	m, tk, err := sb.ReceiveReplication(context.Background())
	if err != nil {
		return err
	}
	devs := reps.devices(m)
	defer m.Close()
	defer devs.Close()
	if tk.Fence != nil {
		defer tk.Fence.Close()
	}
	return superviseOn(ep, m, &f, devs, replicate.NewNode(reportArrival(tk), tk, tk.Fence))
}

// openStandbyDisks opens the standby's own copies of the source's disks
// (files or block devices of the same sizes): the initial sync copies the
// source's disks into them, then each checkpoint's writes are applied.
// keep says, by disk, which must stay allocated (nodiscard).
func openStandbyDisks(f *runFlags) (files []*os.File, keep []bool, err error) {
	for _, s := range f.disks {
		d, err := parseDisk(s)
		if err != nil {
			closeFiles(files)
			return nil, nil, err
		}
		df, err := os.OpenFile(d.path, os.O_RDWR, 0)
		if err != nil {
			closeFiles(files)
			return nil, nil, fmt.Errorf("--disk %s: %w", d.path, err)
		}
		files = append(files, df)
		keep = append(keep, d.noDiscard)
	}
	return files, keep, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		_ = f.Close()
	}
}

// replicas builds the standby's machines for the primaries it follows
// (replicate.StandbyConfig.Build) and remembers each one's devices until
// it is discarded.
type replicas struct {
	f     *runFlags
	mu    sync.Mutex
	built map[*vmm.Machine]*machineDevices // mu guards built
}

// build makes a machine of the primary's shape with this host's devices.
func (r *replicas) build(id stream.Identity) (replicate.Replica, error) {
	nics, disks, _, err := r.f.devices()
	if err != nil {
		return replicate.Replica{}, err
	}
	m, d, err := newMachine(vmm.Config{MemSize: replicate.MemSize(id), CPUs: int(id.VCPUs), DirtyTracking: r.f.dirtyTracking}, r.f, nics, disks)
	if err != nil {
		return replicate.Replica{}, err
	}
	r.mu.Lock()
	r.built[m] = d
	r.mu.Unlock()
	return replicate.Replica{Machine: m, NICs: d.nics, Devices: d.attrs, Disks: d.diskLogs, Close: func() {
		r.mu.Lock()
		delete(r.built, m)
		r.mu.Unlock()
		d.Close()
		m.Close()
	}}, nil
}

// devices returns the devices of the replica m.
func (r *replicas) devices(m *vmm.Machine) *machineDevices {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.built[m]
}

// reportArrival says how the guest came to run here, and returns that
// as the VMM's origin: taken over from a lost primary, or migrated.
func reportArrival(tk replicate.Takeover) replicate.Origin {
	won := ""
	if tk.Fence != nil {
		won = fmt.Sprintf(" (won generation %d at the witness in %v)", tk.Fence.Generation(), tk.Claim.Round(time.Millisecond))
	}
	if tk.Cause != nil {
		fmt.Fprintf(os.Stderr, "govmm: standby: primary lost (%v); took over at checkpoint %d in %v%s\n", tk.Cause, tk.Epoch, tk.Took, won)
		return replicate.TookOver
	}
	fmt.Fprintf(os.Stderr, "govmm: standby: migration received; running the guest%s\n", won)
	return replicate.Migrated
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

// streamSpin is --read-spin or --ack-spin as stream.Config takes it: 0,
// never polling, is a negative spin there.
func streamSpin(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
