package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"govmm/replicate/stream"
	"govmm/replicate/witness"
)

const witnessUsage = `Usage: govmm witness --listen HOST:PORT --key-file FILE --state DIR [flags]
       govmm witness --state DIR --list

Runs the witness: the arbiter that makes sure at most one VMM releases a
protected guest's output (docs/FENCING.md). For every VM it keeps a
generation number and who holds it, saved in --state (atomically, fsynced)
so that a restart forgets nothing, and grants leases on it: a primary
releases output only while its lease is valid, and a standby takes over
only after winning the next generation, which the witness grants once the
primary's lease has run out. Run it on a third host that both the primary
and the standby can reach. VMMs must prove the same pre-shared key
(--key-file, as for replication). Never copy, restore or share a state
directory: a witness that forgot a generation could grant it twice.

Flags:
`

func cmdWitness(args []string) error {
	fs := newFlagSet("witness", witnessUsage)
	var listenAddr string
	listen := &listenAddr
	fs.Var(hostPortFlag{listen}, "listen", "address to serve VMMs on, `HOST:PORT`")
	keyFile := fs.String("key-file", "", "pre-shared key, the VMMs' --key-file (mode 0600, at least 16 bytes)")
	state := fs.String("state", "", "`DIR` of the generations (created 0700 if missing; one witness at a time)")
	var maxLeaseD time.Duration
	maxLease := &maxLeaseD
	durationVar(fs, maxLease, "max-lease", witness.DefaultMaxLease, leaseCheck, "longest lease granted (after a restart, claims wait one lease)")
	list := fs.Bool("list", false, "print the generations saved in --state and exit")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("witness", "unexpected argument %q", fs.Arg(0))
	}
	if *state == "" {
		return usagef("witness", "--state DIR is required")
	}
	if *list {
		if err := refuseUnused(fs, "with --list, which only reads --state", "listen", "key-file", "max-lease"); err != nil {
			return err
		}
		return listWitnessState(*state)
	}
	if *listen == "" {
		return usagef("witness", "--listen HOST:PORT is required")
	}
	if *keyFile == "" {
		return usagef("witness", "--key-file is required: the witness serves only VMMs that share its key")
	}
	key, err := stream.LoadKey(*keyFile)
	if err != nil {
		return fmt.Errorf("witness: %w", err)
	}
	// Grants and refusals are what an operator reads the witness's log
	// for: Info unless GOVMM_LOG says otherwise.
	log := slog.Default()
	if os.Getenv("GOVMM_LOG") == "" {
		log = slog.New(newCLIHandler(os.Stderr, slog.LevelInfo))
	}
	srv, err := witness.NewServer(witness.ServerConfig{Key: key, StateDir: *state, MaxLease: *maxLease, Logger: log})
	if err != nil {
		return err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("witness: %w", err)
	}
	fmt.Fprintf(os.Stderr, "govmm: witness: listening on %s (state %s, %d VMs)\n", ln.Addr(), *state, srv.Stats().VMs)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	go func() {
		if _, ok := <-sig; ok {
			srv.Close()
		}
	}()
	if err := srv.Serve(ln); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "govmm: witness: stopped\n")
	return nil
}

func listWitnessState(dir string) error {
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("witness: --state: %w", err)
	}
	recs, err := witness.ReadState(dir)
	if err != nil {
		return fmt.Errorf("witness: %w", err)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tGENERATION\tHOLDER\tLEASE")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%v\n", r.VM, r.Generation, r.Holder, r.Lease)
	}
	return tw.Flush()
}

// witnessAcquireTimeout bounds a booting primary's wait for its first
// generation: long enough to wait out the lease of a VMM of this VM that
// just died, and a few retries, short enough to say soon that the witness
// is not there.
func witnessAcquireTimeout(lease time.Duration) time.Duration { return 2*lease + 2*time.Second }

// newWitnessClient is this VMM's client of --witness, as role ("primary",
// "standby"), for the VM --name, with --key-file's key.
func newWitnessClient(f *runFlags, role, where string) (*witness.Client, error) {
	if f.keyFile == "" {
		return nil, fmt.Errorf("--witness %s: --key-file is required: the witness serves only VMMs that share its key", f.witness)
	}
	key, err := stream.LoadKey(f.keyFile)
	if err != nil {
		return nil, fmt.Errorf("--witness %s: %w", f.witness, err)
	}
	host, _ := os.Hostname()
	holder := fmt.Sprintf("%s %s pid %d", role, host, os.Getpid())
	if where != "" {
		holder = fmt.Sprintf("%s %s %s pid %d", role, host, where, os.Getpid())
	}
	// The witness takes names of at most witness.MaxName bytes, with the
	// client's random suffix: keep the start, which says who.
	if len(holder) > witness.MaxName-32 {
		holder = strings.ToValidUTF8(holder[:witness.MaxName-32], "")
	}
	return witness.NewClient(witness.Config{Addr: f.witness, Key: key, VM: f.name, Holder: holder, Lease: f.witnessLease})
}

// acquireLease takes a booting primary's first generation of --name at
// --witness. Failing that, the guest must not start: without a lease its
// output could never leave, and running it without the witness would be
// the unprotected run that --witness was given to prevent.
func acquireLease(f *runFlags) (*witness.Lease, error) {
	c, err := newWitnessClient(f, "primary", f.apiSock)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), witnessAcquireTimeout(f.witnessLease))
	defer cancel()
	lease, err := c.Acquire(ctx)
	switch {
	case errors.Is(err, witness.ErrHolderAlive), errors.Is(err, witness.ErrHeld):
		return nil, fmt.Errorf("--witness: VM %q runs elsewhere (its holder renews its lease): not starting it here: %w", f.name, err)
	case err != nil:
		return nil, fmt.Errorf("--witness: no generation of VM %q: %w (the guest is not started: it would run without protection against split brain)", f.name, err)
	}
	fmt.Fprintf(os.Stderr, "govmm: witness %s: generation %d of %s, lease %v\n", f.witness, lease.Generation(), f.name, lease.Status().Lease)
	return lease, nil
}

// splitBrainWarning is said once per process, when replication starts
// without a witness.
var splitBrainWarning sync.Once

func warnSplitBrain() {
	splitBrainWarning.Do(func() {
		fmt.Fprintln(os.Stderr, "govmm: WARNING: replicating WITHOUT A WITNESS (--witness): if the primary and the standby lose each other while both live "+
			"(a cut link, a stopped or stalled primary), both may run the guest and answer its clients: SPLIT BRAIN. "+
			"Acceptable only where that cannot happen without one of them dying; see docs/FENCING.md.")
	})
}

// fencedStatus is the exit status of a VMM that was fenced: another VMM
// won a newer generation of its guest, which this one stopped for good.
const fencedStatus = 3
