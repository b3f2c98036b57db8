package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"

	"govmm/ctlapi"
	"govmm/replicate"
)

const ctlUsage = `Usage: govmm ctl [--api-sock PATH | --name NAME] COMMAND [flags]

Controls a running VM through its API socket: HTTP/JSON on a unix socket,
served by 'govmm run' and 'govmm restore' (at their --api-sock, by default
/run/govmm/NAME.sock for their --name NAME) and by 'govmm standby
--api-sock PATH'.

Commands:
  info [--json]           name, state, vCPUs, memory, devices, uptime, replication,
                          fencing (the witness: lease, generation, FENCED; on a
                          standby, whether failover would be possible); on a
                          standby, what it receives: peer, last checkpoint and
                          its lag, bytes, witness
  pause                   stop every vCPU
  resume                  start them again
  snapshot --out FILE     write a snapshot to FILE on the VM's host (a relative
                          FILE is taken from this directory)
  migrate --to HOST:PORT [--force]
                          live-migrate to a standby: progress on stderr, then a
                          report; Ctrl-C cancels the migration. A replicated VM
                          is refused: --force stops its replication first, and
                          the guest runs UNPROTECTED at the destination
  replicate --to HOST:PORT [--epoch D]
                          protect the running VM with a standby (govmm standby
                          --listen HOST:PORT); returns once it is protected
  unreplicate             stop replicating; the guest runs on unprotected
  stats [--json]          the VM's (or the standby's) metrics as a table, in
                          units (540µs, 12.3 MiB), then figures derived from
                          them (wire bytes per dirty page); --json: raw values
  metrics                 the metrics in Prometheus text format

The socket is --api-sock if given, else $GOVMM_API_SOCK, else
/run/govmm/NAME.sock for --name NAME (default govmm: a VM run without
--name or --api-sock), in $XDG_RUNTIME_DIR/govmm/ instead for a user other
than root when $XDG_RUNTIME_DIR is set.

Flags:
`

func cmdCtl(args []string) error {
	fs := newFlagSet("ctl", ctlUsage)
	sock := fs.String("api-sock", ctlapi.DefaultSocketPath(), "the VM's API `socket`")
	vmName := fs.String("name", "", "the VM's --name: its default socket")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *vmName != "" {
		if given(fs)["api-sock"] {
			return usagef("ctl", "--api-sock and --name: give one")
		}
		*sock = ctlapi.SocketPathFor(*vmName)
	}
	if fs.NArg() == 0 {
		return usagef("ctl", "no command (info, pause, resume, snapshot, migrate, replicate, unreplicate, stats, metrics)")
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	cmds := map[string]func(context.Context, *ctlapi.Client, []string) error{
		"info":        ctlInfo,
		"pause":       ctlPause,
		"resume":      ctlResume,
		"snapshot":    ctlSnapshot,
		"migrate":     ctlMigrate,
		"stats":       ctlStats,
		"metrics":     ctlMetrics,
		"replicate":   ctlReplicate,
		"unreplicate": ctlUnreplicate,
	}
	run, ok := cmds[name]
	if !ok {
		return usagef("ctl", "unknown command %q", name)
	}
	c := ctlapi.NewClient(*sock)
	defer c.Close()
	// Ctrl-C cancels the request, and the server cancels the operation.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, c, rest)
	if errors.Is(err, ctlapi.ErrNoServer) && !given(fs)["api-sock"] && *vmName == "" {
		// Where ctl looked is a default: say how to look elsewhere.
		return fmt.Errorf("%w (the default socket: give --api-sock PATH, or --name NAME for a VM run with --name)", err)
	}
	if err != nil && errors.Is(err, context.Canceled) && ctx.Err() != nil {
		fmt.Fprintf(os.Stderr, "govmm ctl: %s cancelled\n", name)
		return exitError{130}
	}
	return err
}

// ctlFlags parses a subcommand's flags and refuses positional arguments.
func ctlFlags(name, synopsis string, args []string, register func(*flag.FlagSet)) error {
	fs := newFlagSet("ctl "+name, "Usage: govmm ctl [--api-sock PATH] "+synopsis+"\n\nFlags:\n")
	if register != nil {
		register(fs)
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef(fs.Name(), "unexpected argument %q", fs.Arg(0))
	}
	return nil
}

func ctlInfo(ctx context.Context, c *ctlapi.Client, args []string) error {
	var raw bool
	if err := ctlFlags("info", "info [--json]", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&raw, "json", false, "print the API's JSON as it is")
	}); err != nil {
		return err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return err
	}
	if raw {
		b, err := json.MarshalIndent(info, "", "  ")
		if err != nil {
			return err
		}
		fmt.Printf("%s\n", b)
		return nil
	}
	var repl []string
	if info.Role != "" {
		repl = append(repl, info.Role)
	}
	if info.Peer != "" {
		repl = append(repl, "peer "+info.Peer)
	}
	if len(repl) == 0 {
		repl = append(repl, "none")
	}
	devices := strings.Join(info.Devices, ", ")
	if devices == "" {
		devices = "none"
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "name\t%s\n", info.Name)
	fmt.Fprintf(tw, "state\t%s\n", info.State)
	if info.Standby == nil { // a standby runs no machine yet
		fmt.Fprintf(tw, "vcpus\t%d\n", info.VCPUs)
		fmt.Fprintf(tw, "memory\t%s\n", ctlBytes(info.MemoryBytes))
		fmt.Fprintf(tw, "devices\t%s\n", devices)
	}
	fmt.Fprintf(tw, "uptime\t%s\n", humanDuration(info.Uptime))
	fmt.Fprintf(tw, "replication\t%s\n", strings.Join(repl, ", "))
	if sb := info.Standby; sb != nil {
		cp := "none yet"
		if sb.Checkpoint > 0 {
			cp = strconv.FormatUint(sb.Checkpoint, 10)
			if sb.Lag > 0 {
				cp += fmt.Sprintf(" (committed %s ago)", humanDuration(sb.Lag))
			}
		}
		fmt.Fprintf(tw, "checkpoint\t%s\n", cp)
		fmt.Fprintf(tw, "received\t%s\n", ctlBytes(sb.BytesReceived))
		w := sb.Witness
		if w == "" {
			w = "none"
		}
		fmt.Fprintf(tw, "witness\t%s\n", w)
	}
	if info.Fencing != "" {
		fmt.Fprintf(tw, "fencing\t%s\n", info.Fencing)
	}
	return tw.Flush()
}

func ctlPause(ctx context.Context, c *ctlapi.Client, args []string) error {
	if err := ctlFlags("pause", "pause", args, nil); err != nil {
		return err
	}
	return c.Pause(ctx)
}

func ctlResume(ctx context.Context, c *ctlapi.Client, args []string) error {
	if err := ctlFlags("resume", "resume", args, nil); err != nil {
		return err
	}
	return c.Resume(ctx)
}

func ctlSnapshot(ctx context.Context, c *ctlapi.Client, args []string) error {
	var out string
	if err := ctlFlags("snapshot", "snapshot --out FILE", args, func(fs *flag.FlagSet) {
		fs.StringVar(&out, "out", "", "snapshot `file` to write (on the VM's host)")
	}); err != nil {
		return err
	}
	if out == "" {
		return usagef("ctl snapshot", "--out FILE is required")
	}
	res, err := c.Snapshot(ctx, out)
	if err != nil {
		return err
	}
	fmt.Printf("snapshot written to %s: %s, %d pages (%d zero pages elided); vCPUs paused %s\n",
		res.Path, ctlBytes(res.Bytes), res.Pages, res.ZeroPages, ctlDuration(res.Pause))
	return nil
}

func ctlMigrate(ctx context.Context, c *ctlapi.Client, args []string) error {
	var req ctlapi.MigrateRequest
	if err := ctlFlags("migrate", "migrate --to HOST:PORT [--force]", args, func(fs *flag.FlagSet) {
		fs.StringVar(&req.To, "to", "", "the standby's `host:port`")
		fs.BoolVar(&req.Force, "force", false, "migrate a replicated VM too: its replication stops, and the guest runs UNPROTECTED at the destination")
	}); err != nil {
		return err
	}
	to := req.To
	if to == "" {
		return usagef("ctl migrate", "--to HOST:PORT is required")
	}
	bar := newCtlBar(os.Stderr, ctlIsTerminal(os.Stderr))
	res, err := c.Migrate(ctx, req, bar.update)
	bar.finish()
	if err != nil {
		return err
	}
	if res.DroppedProtection != "" {
		fmt.Fprintf(os.Stderr, "govmm ctl: warning: the guest runs UNPROTECTED at %s: replication to %s was stopped for the migration (protect it with 'govmm ctl replicate --to HOST:PORT' on the destination's --api-sock)\n",
			to, res.DroppedProtection)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "migrated to %s\n", to)
	fmt.Fprintf(tw, "  total time\t%s\n", ctlDuration(res.TotalTime))
	fmt.Fprintf(tw, "  downtime\t%s\n", ctlDuration(res.Downtime))
	fmt.Fprintf(tw, "  rounds\t%d\n", res.Rounds)
	fmt.Fprintf(tw, "  sent\t%s in %d pages\n", ctlBytes(res.BytesSent), res.PagesSent)
	return tw.Flush()
}

func ctlStats(ctx context.Context, c *ctlapi.Client, args []string) error {
	var raw bool
	if err := ctlFlags("stats", "stats [--json]", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&raw, "json", false, "print the API's JSON as it is (raw values: seconds, bytes)")
	}); err != nil {
		return err
	}
	st, err := c.Stats(ctx)
	if err != nil {
		return err
	}
	if raw {
		b, err := json.MarshalIndent(st, "", "  ")
		if err != nil {
			return err
		}
		fmt.Printf("%s\n", b)
		return nil
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "METRIC\tLABELS\tVALUE")
	for _, r := range statsRows(st.Metrics) {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.name, r.labels, r.value)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(st.Derived) == 0 {
		return nil
	}
	fmt.Println()
	tw = tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DERIVED\tVALUE")
	for _, d := range st.Derived {
		fmt.Fprintf(tw, "%s\t%s\n", d.Name, humanDerived(d))
	}
	return tw.Flush()
}

func ctlMetrics(ctx context.Context, c *ctlapi.Client, args []string) error {
	if err := ctlFlags("metrics", "metrics", args, nil); err != nil {
		return err
	}
	text, err := c.Metrics(ctx)
	if err != nil {
		return err
	}
	_, err = io.WriteString(os.Stdout, text)
	return err
}

func ctlReplicate(ctx context.Context, c *ctlapi.Client, args []string) error {
	var req ctlapi.ReplicateRequest
	if err := ctlFlags("replicate", "replicate --to HOST:PORT [--epoch D] [--epoch-max D]", args, func(fs *flag.FlagSet) {
		fs.StringVar(&req.To, "to", "", "the standby, HOST:PORT")
		fs.Func("epoch", "checkpoint interval, a `duration` (default: the VM's --epoch)", func(s string) error {
			req.Epoch = s
			_, err := parseEpoch(s) // as the VMM will: one check
			return err
		})
		fs.Func("epoch-max", "adaptive epochs up to this `duration`, 0 for fixed ones (default: the VM's --epoch-max)", func(s string) error {
			req.EpochMax = s
			_, err := parseMaxEpoch(s)
			return err
		})
	}); err != nil {
		return err
	}
	if req.To == "" {
		return usagef("ctl replicate", "--to HOST:PORT is required")
	}
	bar := newTransferBar(os.Stderr, ctlIsTerminal(os.Stderr), "initial sync")
	err := c.Replicate(ctx, req, func(p ctlapi.Progress) {
		bar.update(p.BytesSent, p.TotalBytes, syncNote(replicate.SyncProgress{Round: p.Round, Acking: p.Phase == ctlapi.PhaseSyncAck}))
	})
	bar.finish()
	if err != nil {
		return err
	}
	fmt.Printf("protected by %s\n", req.To)
	return nil
}

func ctlUnreplicate(ctx context.Context, c *ctlapi.Client, args []string) error {
	if err := ctlFlags("unreplicate", "unreplicate", args, nil); err != nil {
		return err
	}
	if err := c.StopReplication(ctx); err != nil {
		return err
	}
	fmt.Println("replication stopped: the guest runs unprotected")
	return nil
}
