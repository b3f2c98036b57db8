package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

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
                          units (540µs, 12.3 MiB); --json: raw values
  metrics                 the same in Prometheus text format

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
	return tw.Flush()
}

// statsRow is one line of ctl stats.
type statsRow struct{ name, labels, value string }

// statsRows turns samples (in the server's sorted order) into lines for a
// person: durations and sizes in units, and each histogram in one line
// (count, mean and quantiles read off its buckets) instead of its
// buckets.
func statsRows(ms []ctlapi.Metric) []statsRow {
	var rows []statsRow
	hists := map[string]*statsHist{} // by family and labels
	for _, m := range ms {
		if m.Type == "histogram" {
			base, part := histPart(m.Name)
			lk := labelText(m.Labels, "le")
			h := hists[base+lk]
			if h == nil {
				h = &statsHist{seconds: strings.HasSuffix(base, "_seconds")}
				hists[base+lk] = h
				rows = append(rows, statsRow{name: base, labels: lk})
				h.row = len(rows) - 1
			}
			h.add(part, m)
			continue
		}
		rows = append(rows, statsRow{name: m.Name, labels: labelText(m.Labels, ""), value: humanValue(m.Name, m.Value)})
	}
	for _, h := range hists {
		rows[h.row].value = h.String()
	}
	return rows
}

// histPart splits a histogram sample's name into its family and part
// (bucket, sum or count).
func histPart(name string) (base, part string) {
	for _, p := range []string{"_bucket", "_sum", "_count"} {
		if b, ok := strings.CutSuffix(name, p); ok {
			return b, p[1:]
		}
	}
	return name, ""
}

// labelText writes labels sorted, leaving out skip; "-" for none.
func labelText(labels map[string]string, skip string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		if k != skip {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%q", k, labels[k])
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

// statsHist gathers one histogram's samples.
type statsHist struct {
	row        int
	seconds    bool
	le         []float64 // bucket bounds, in the order served (increasing)
	cum        []float64 // cumulative counts
	sum, count float64
}

func (h *statsHist) add(part string, m ctlapi.Metric) {
	switch part {
	case "bucket":
		le, err := strconv.ParseFloat(m.Labels["le"], 64)
		if err != nil {
			le = math.Inf(1)
		}
		h.le, h.cum = append(h.le, le), append(h.cum, m.Value)
	case "sum":
		h.sum = m.Value
	case "count":
		h.count = m.Value
	}
}

// String is "n=1234 mean=540µs p50<=500µs p99<=5ms": a quantile is the
// bound of the first bucket that holds it, which is all a histogram
// knows.
func (h *statsHist) String() string {
	unit := func(v float64) string {
		if h.seconds {
			return humanSeconds(v)
		}
		return ctlValue(v)
	}
	if h.count == 0 {
		return "n=0"
	}
	s := fmt.Sprintf("n=%s mean=%s", ctlValue(h.count), unit(h.sum/h.count))
	for _, q := range []struct {
		name string
		q    float64
	}{{"p50", 0.5}, {"p99", 0.99}} {
		for i, c := range h.cum {
			if c >= q.q*h.count {
				if math.IsInf(h.le[i], 1) {
					bound := "?"
					if i > 0 {
						bound = unit(h.le[i-1])
					}
					s += fmt.Sprintf(" %s>%s", q.name, bound)
				} else {
					s += fmt.Sprintf(" %s<=%s", q.name, unit(h.le[i]))
				}
				break
			}
		}
	}
	return s
}

// humanValue writes a metric's value for a person, in the unit its name
// says (Prometheus names carry base units: seconds, bytes).
func humanValue(name string, v float64) string {
	base := strings.TrimSuffix(name, "_total")
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return ctlValue(v)
	case strings.HasSuffix(base, "_seconds"):
		return humanSeconds(v)
	case strings.HasSuffix(base, "_bytes") && v >= 0 && v < math.MaxUint64:
		return ctlBytes(uint64(v))
	}
	return ctlValue(v)
}

// humanSeconds writes seconds as humanDuration does: 540µs, 1.23ms,
// 25.3s, 1h2m3s.
func humanSeconds(v float64) string {
	if v < 0 {
		return "-" + humanSeconds(-v)
	}
	return humanDuration(time.Duration(v * float64(time.Second)))
}

// humanDuration writes d with up to three significant digits below a
// minute: 0s, 12ns, 540µs, 1.23ms, 2s, 25.3s; from a minute on, to the
// second.
func humanDuration(d time.Duration) string {
	if d >= time.Minute {
		return d.Round(time.Second).String()
	}
	for _, u := range []struct {
		unit time.Duration
		name string
	}{{time.Second, "s"}, {time.Millisecond, "ms"}, {time.Microsecond, "µs"}} {
		if d >= u.unit {
			v := float64(d) / float64(u.unit)
			s := strconv.FormatFloat(v, 'f', max(0, 2-int(math.Floor(math.Log10(v)))), 64)
			if strings.Contains(s, ".") {
				s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
			}
			return s + u.name
		}
	}
	return d.String()
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

// ctlBar draws a migration's progress. On a terminal it redraws one line
// (at most every ctlBarEvery, and at each new round or phase); elsewhere it
// prints one line per round or phase, which reads well in a log. Each
// round's bar fills as its remaining pages drain; the largest remaining
// count seen in a round stands for the round's size.
type ctlBar struct {
	w            io.Writer
	tty          bool
	round        int
	phase        string
	roundPages   uint64
	last         ctlapi.Progress
	drawn        bool
	lastDraw     time.Time
	lastProgress bool // an update arrived since the last draw
}

const (
	ctlBarWidth = 30
	ctlBarEvery = 100 * time.Millisecond
)

func newCtlBar(w io.Writer, tty bool) *ctlBar { return &ctlBar{w: w, tty: tty, round: -1} }

func (b *ctlBar) update(p ctlapi.Progress) {
	changed := p.Round != b.round || p.Phase != b.phase
	if changed {
		b.round, b.phase, b.roundPages = p.Round, p.Phase, 0
	}
	b.roundPages = max(b.roundPages, p.RemainingPages)
	b.last, b.lastProgress = p, true
	switch {
	case !b.tty && changed:
		fmt.Fprintf(b.w, "migrate: %s round %d: %s sent, %d pages dirty, %d to send\n",
			p.Phase, p.Round, ctlBytes(p.BytesSent), p.DirtyPages, p.RemainingPages)
	case b.tty && (changed || time.Since(b.lastDraw) >= ctlBarEvery):
		b.draw()
	}
}

// finish draws the last state and ends the bar's line.
func (b *ctlBar) finish() {
	if !b.tty || !b.drawn {
		return
	}
	if b.lastProgress {
		b.draw()
	}
	fmt.Fprintln(b.w)
}

func (b *ctlBar) draw() {
	p := b.last
	frac := 1.0
	if p.Phase != ctlapi.PhaseDone && b.roundPages > 0 {
		frac = float64(b.roundPages-min(p.RemainingPages, b.roundPages)) / float64(b.roundPages)
	}
	// \r returns to the line's start and \x1b[K clears what a longer
	// earlier line left.
	fmt.Fprintf(b.w, "\r%-13s round %-3d [%s] %3d%%  %s sent, %d dirty\x1b[K",
		p.Phase, p.Round, barText(frac), int(frac*100), ctlBytes(p.BytesSent), p.DirtyPages)
	b.drawn, b.lastDraw, b.lastProgress = true, time.Now(), false
}

// barText is a progress bar ctlBarWidth wide, frac (0..1) of it filled:
// "=====>    ".
func barText(frac float64) string {
	fill := int(frac * ctlBarWidth)
	bar := strings.Repeat("=", fill)
	if fill < ctlBarWidth {
		bar += ">" + strings.Repeat(" ", ctlBarWidth-fill-1)
	}
	return bar
}

// ctlIsTerminal reports whether f is a terminal.
func ctlIsTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// ctlBytes writes n in binary units: 512 B, 1.5 KiB, 256 MiB.
func ctlBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for v >= unit && i < 5 {
		v /= unit
		i++
	}
	s := fmt.Sprintf("%.1f", v)
	s = strings.TrimSuffix(s, ".0")
	return s + " " + []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}[i]
}

// ctlDuration rounds d to what a person reads: ms above a second, µs below.
func ctlDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(time.Microsecond).String()
	}
	return d.String()
}

// ctlValue writes a metric value: integers without an exponent.
func ctlValue(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e15 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%g", v)
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
