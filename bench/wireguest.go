package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"govmm/guestimg"
	"govmm/replicate/stream"
)

// The wire-guest suite's workloads, run one after the other inside each
// replicated guest.
const (
	// WorkloadDemo is the demo service under client load: POST /incr on
	// keep-alive connections, as overhead-guest drives it.
	WorkloadDemo = "demo"
	// WorkloadUntar unpacks a tarball of the guest's own root file system
	// (binaries, kernel modules, libraries) and of its kernel's symbol
	// table (text) into tmpfs, over and over.
	WorkloadUntar = "untar"
	// WorkloadCompress stands in for a build, which the default guest
	// cannot do (it has no compiler): sort the symbol table (a heap of
	// lines, as a compiler's) and gzip the tarball (CPU), writing both
	// results to tmpfs, over and over.
	WorkloadCompress = "compress"
	// WorkloadDisk unpacks the same tarball onto the guest's disk (/data,
	// ext4 on virtio-blk) and syncs, over and over: most of what the
	// stream carries is then the guest's disk writes (Disk frames).
	WorkloadDisk = "disk"
)

// WireGuestWorkloads are the workloads in the order they run.
var WireGuestWorkloads = []string{WorkloadDemo, WorkloadUntar, WorkloadCompress, WorkloadDisk}

// RawPageBytes is what a dirty page costs the stream uncompressed,
// without deltas: its 4096 bytes and its 16-byte entry in a page section
// (docs/FORMATS.md). The suite's "× raw" is wire bytes per dirty page
// over this.
const RawPageBytes = 4096 + 16

// WireGuestConfig parameterises the wire-guest suite: the stream's bytes
// per dirty page on real-guest workloads, per stream mode, where Linux
// boots (hardware KVM, or the lab).
type WireGuestConfig struct {
	Govmm          string // the govmm binary
	Kernel, Initrd string // the default guest image
	// Baseline, if set, is another govmm binary (e.g. a build of main)
	// replicated beside Govmm, as "baseline", in every mode and trial:
	// a stream change measured side by side with what it changes, on
	// the same workloads in the same run.
	Baseline  string
	Modes     []StreamMode // default none, s2, s2+deltas, zstd+deltas
	Workloads []string     // default WireGuestWorkloads
	Trials    int          // boots per mode (default 1)
	Clients   int          // demo: keep-alive connections (default 4)
	// Warmup runs after a workload starts; the primary's counters are
	// read as the Window opens and as it closes.
	Warmup, Window time.Duration
	// Timeout is both ends' --failover-timeout (default 3s: the lab).
	Timeout time.Duration
	Out     string
	Log     io.Writer
}

func (cfg *WireGuestConfig) defaults() {
	if len(cfg.Modes) == 0 {
		cfg.Modes = []StreamMode{{Compression: stream.CompressNone}, {Compression: stream.CompressS2},
			{Compression: stream.CompressS2, Deltas: true}, {Compression: stream.CompressZstd, Deltas: true}}
	}
	if len(cfg.Workloads) == 0 {
		cfg.Workloads = WireGuestWorkloads
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 1
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 4
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 3 * time.Second
	}
	if cfg.Window <= 0 {
		cfg.Window = 10 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
}

// WireGuestSample is one workload's window on one replicated guest.
type WireGuestSample struct {
	VMM      string     // "govmm", or "baseline" (WireGuestConfig.Baseline)
	Mode     StreamMode // asked for
	Agreed   StreamMode // what the stream's ends agreed on
	Workload string
	Trial    int
	Span     time.Duration // between the two reads of the counters
	Counters WireCounters  // their growth over the window
	// Work is what the workload got done in the window and its stop:
	// answers (demo) or loop passes (untar, compress; the last one may
	// have been cut short by the stop).
	Work int
}

// WireGuestResult is everything the suite measured.
type WireGuestResult struct {
	Samples []WireGuestSample
	// TarBytes is the size of the tarball untar unpacks (0 if no guest
	// got that far).
	TarBytes int64
	// Failed are the boots that broke (a guest or VMM died, or a workload
	// never answered): the suite goes on, keeps their logs in Out and
	// reports them.
	Failed []string
	Config WireGuestConfig
}

// WireGuest boots the default guest replicated (`govmm run
// --replicate-to` a `govmm standby` over loopback, `--net user`, the demo
// service published on a host port) once per stream mode and trial, and
// runs each workload in it in turn: after Warmup, the primary's
// checkpoint and stream counters (--metrics-listen) are read as Window
// opens and as it closes. Shell workloads are typed on the primary's
// console (the guest's shell).
func WireGuest(ctx context.Context, cfg WireGuestConfig) (*WireGuestResult, error) {
	if cfg.Govmm == "" || cfg.Kernel == "" || cfg.Initrd == "" {
		return nil, errors.New("wire-guest: the govmm binary and the default guest image are needed")
	}
	cfg.defaults()
	dir, err := os.MkdirTemp("", "govmm-bench-wire-guest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	res := &WireGuestResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, mode := range cfg.Modes {
			for _, v := range wireVMMs(cfg, trial) {
				err := wireGuestBoot(ctx, cfg, dir, v, mode, trial, res)
				if ctx.Err() != nil {
					return res, ctx.Err()
				}
				if err != nil {
					f := fmt.Sprintf("%s %s trial %d: %v", v.name, mode, trial, err)
					fmt.Fprintf(cfg.Log, "wire-guest: FAILED %s\n", f)
					res.Failed = append(res.Failed, f)
				}
			}
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

// wireGuest is one replicated guest of the suite: its primary (whose
// stdin is the guest's console), the demo service's URL and the
// primary's metrics.
type wireGuest struct {
	prim    *proc
	console io.WriteCloser
	base    string // the demo service
	metrics string // the primary's /metrics
	marks   int
}

func wireModeFile(m StreamMode) string { return strings.ReplaceAll(m.String(), "+", "-") }

// wireVMM is a govmm binary the suite replicates guests with, and its
// name in the samples.
type wireVMM struct{ name, bin string }

// wireVMMs lists the binaries a mode's trial boots, one after the other:
// govmm, and the baseline when there is one, which goes first in even
// trials (so that neither always boots second, on a host warmed by the
// other).
func wireVMMs(cfg WireGuestConfig, trial int) []wireVMM {
	out := []wireVMM{{"govmm", cfg.Govmm}}
	if cfg.Baseline == "" {
		return out
	}
	b := wireVMM{"baseline", cfg.Baseline}
	if trial%2 == 0 {
		return append([]wireVMM{b}, out...)
	}
	return append(out, b)
}

// wireGuestBoot boots one replicated guest with v's binary in mode and
// runs every workload on it, appending a sample per workload to res.
func wireGuestBoot(ctx context.Context, cfg WireGuestConfig, dir string, v wireVMM, mode StreamMode, trial int, res *WireGuestResult) (rerr error) {
	var disks [2]string
	for i := range disks {
		disks[i] = filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := blankDisk(disks[i], 64<<20); err != nil {
			return err
		}
	}
	var ports [3]int
	for i := range ports {
		p, err := freeLoopbackPort()
		if err != nil {
			return err
		}
		ports[i] = p
	}
	addr, to := fmt.Sprintf("127.0.0.1:%d", ports[1]), cfg.Timeout.String()
	sbArgs := []string{"--listen", addr, "--net", "user", "--disk", disks[1], "--failover-timeout", to}
	if mode.Deltas {
		sbArgs = append(sbArgs, "--stream-deltas")
	}
	sb, err := startStandbyProc(ctx, v.bin, time.Minute, sbArgs...)
	if err != nil {
		return err
	}
	defer sb.kill()
	name := fmt.Sprintf("wire_guest-failed-%s-%d", wireModeFile(mode), trial)
	if v.name != "govmm" {
		name = fmt.Sprintf("wire_guest-failed-%s-%s-%d", v.name, wireModeFile(mode), trial)
	}
	defer func() {
		if rerr != nil {
			sb.keepLogs(cfg.Out, name+"-standby")
		}
	}()
	args := []string{"run", "--kernel", cfg.Kernel, "--initrd", cfg.Initrd, "--net", "user", "--disk", disks[0],
		"--publish", fmt.Sprintf("127.0.0.1:%d:80", ports[0]), "--metrics-listen", fmt.Sprintf("127.0.0.1:%d", ports[2]),
		"--replicate-to", addr, "--failover-timeout", to, "--stream-compress", mode.Compression.String()}
	if mode.Deltas {
		args = append(args, "--stream-deltas")
	}
	g := &wireGuest{base: fmt.Sprintf("http://127.0.0.1:%d", ports[0]), metrics: fmt.Sprintf("http://127.0.0.1:%d/metrics", ports[2])}
	g.prim, g.console, err = startConsoleProc(v.bin, args...)
	if err != nil {
		return err
	}
	defer g.prim.kill()
	defer func() {
		if rerr != nil {
			g.prim.keepLogs(cfg.Out, name+"-primary")
		}
	}()
	if err := waitFor(ctx, g.prim.stderr, g.prim.exited, "protected by", 10*time.Minute); err != nil {
		return fmt.Errorf("primary: %w", err)
	}
	if err := waitFor(ctx, g.prim.stdout, g.prim.exited, guestimg.ReadyLine, 10*time.Minute); err != nil {
		return fmt.Errorf("guest: %w", err)
	}
	if err := awaitHealthy(ctx, &http.Client{Timeout: 2 * time.Second}, g.base, g.prim, 200*time.Millisecond, time.Now().Add(10*time.Minute)); err != nil {
		return err
	}
	if err := g.setup(ctx, res); err != nil {
		return err
	}
	for _, w := range cfg.Workloads {
		s, err := g.run(ctx, cfg, w)
		if err != nil {
			return fmt.Errorf("%s: %w", w, err)
		}
		s.VMM, s.Mode, s.Trial = v.name, mode, trial
		fmt.Fprintf(cfg.Log, "wire-guest: %-8s %-12s %-8s trial %d: %6.0f dirty pages/s, %5.0f wire B per dirty page (%.3f× raw), page bytes %.3f× (%d passes or answers)\n",
			v.name, mode, w, trial, s.Counters.DirtyPages/s.Span.Seconds(), s.Counters.BytesPerDirtyPage(), s.Counters.TimesRaw(), s.Counters.PageRatio(), s.Work)
		res.Samples = append(res.Samples, s)
	}
	return nil
}

// startConsoleProc is startProc with a pipe to the process's stdin (the
// guest's console).
func startConsoleProc(govmm string, args ...string) (*proc, io.WriteCloser, error) {
	p := &proc{cmd: exec.Command(govmm, args...), stdout: &lockedBuffer{}, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	in, err := p.cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	if err := p.cmd.Start(); err != nil {
		return nil, nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	return p, in, nil
}

// The guest's files for the shell workloads, in tmpfs (the initramfs).
const (
	wireSrc  = "/tmp/wsrc"     // the symbol table, as text
	wireTar  = "/tmp/wsrc.tar" // the root file system and the symbol table
	wireStop = "/tmp/wire-stop"
)

// typeLine types one line on the guest's console.
func (g *wireGuest) typeLine(l string) error {
	_, err := io.WriteString(g.console, l+"\n")
	return err
}

// command types a shell line that ends by printing a mark, and waits up
// to timeout for the mark: the console echoes the line as typed, so the
// mark is written as arithmetic the shell evaluates ($((N+1))), and only
// the shell's output holds its value. The mark is followed by the line's
// value of $out, if any, which the returned string holds.
func (g *wireGuest) command(ctx context.Context, line, out string, timeout time.Duration) (string, error) {
	g.marks++
	n := 7000 + 2*g.marks
	mark := fmt.Sprintf("wire-mark-%d", n+1)
	re := regexp.MustCompile(regexp.QuoteMeta(mark) + ` ?(\S*)\r?\n`)
	if err := g.typeLine(fmt.Sprintf("%s; echo wire-mark-$((%d+1)) %s", line, n, out)); err != nil {
		return "", err
	}
	deadline := time.Now().Add(timeout)
	for {
		if m := re.FindStringSubmatch(g.prim.stdout.String()); m != nil {
			return m[1], nil
		}
		select {
		case <-g.prim.exited:
			return "", fmt.Errorf("govmm exited: %s", lastLine(g.prim.stderr.String()))
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(20 * time.Millisecond): // polling the console
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no answer to %q within %v", line, timeout)
		}
	}
}

// setup waits for the shell (which may miss a line typed before it
// reads: a line is typed each second until one answers) and makes the
// shell workloads' source files: the kernel's symbol table as text, and a
// tarball of the root file system and that text.
func (g *wireGuest) setup(ctx context.Context, res *WireGuestResult) error {
	answered := regexp.MustCompile(`wire-ready-42\r?\n`)
	for try := 0; !answered.MatchString(g.prim.stdout.String()); try++ {
		if try == 120 {
			return errors.New("the guest's shell never answered")
		}
		if err := g.typeLine("echo wire-ready-$((6*7))"); err != nil {
			return err
		}
		if err := sleepCtx(ctx, g.prim.exited, time.Second); err != nil { // polling the console
			return err
		}
	}
	size, err := g.command(ctx, fmt.Sprintf("mkdir -p %[1]s && cat /proc/kallsyms > %[1]s/kallsyms.txt && cd / && "+
		"tar -cf %[2]s $(ls -d bin sbin lib usr etc 2>/dev/null) %[3]s/kallsyms.txt; cd /", wireSrc, wireTar, strings.TrimPrefix(wireSrc, "/")),
		fmt.Sprintf("$(stat -c %%s %s)", wireTar), 3*time.Minute)
	if err != nil {
		return err
	}
	n, err := strconv.ParseInt(size, 10, 64)
	if err != nil || n < 1<<20 {
		return fmt.Errorf("the tarball in the guest: %q bytes", size)
	}
	res.TarBytes = n
	return nil
}

// wireLoops are the shell workloads' loop bodies.
var wireLoops = map[string]string{
	WorkloadUntar:    fmt.Sprintf("rm -rf /tmp/wx; mkdir /tmp/wx; tar -xf %s -C /tmp/wx", wireTar),
	WorkloadCompress: fmt.Sprintf("sort -k3 %s/kallsyms.txt > /tmp/wsorted; gzip -c %s > /tmp/wtar.gz", wireSrc, wireTar),
	WorkloadDisk:     fmt.Sprintf("rm -rf /data/wx; sync; mkdir /data/wx; tar -xf %s -C /data/wx; sync", wireTar),
}

// wireCleanup is what each shell workload leaves behind, removed after it.
const wireCleanup = "rm -rf /tmp/wx /tmp/wsorted /tmp/wtar.gz /data/wx; sync"

// run runs workload w for cfg.Warmup+cfg.Window and returns its sample.
func (g *wireGuest) run(ctx context.Context, cfg WireGuestConfig, w string) (WireGuestSample, error) {
	s := WireGuestSample{Workload: w}
	var m0, m1 Metrics
	var t0 time.Time
	var err error
	if w == WorkloadDemo {
		var merr error
		opened := make(chan struct{})
		atStart := func() { t0 = time.Now(); m0, merr = g.scrape(ctx); close(opened) }
		lat, _, _, lerr := loadWindow(ctx, g.base, cfg.Clients, cfg.Warmup, cfg.Window, g.prim.exited, atStart)
		if lerr != nil {
			return s, lerr
		}
		select {
		case <-opened: // the window ends after it opens: the scrape's end
		case <-ctx.Done():
			return s, ctx.Err()
		}
		if merr != nil {
			return s, merr
		}
		s.Work = len(lat)
	} else {
		loop := fmt.Sprintf("rm -f %[1]s; (n=0; while [ ! -e %[1]s ]; do { %[2]s; } >/dev/null 2>&1; n=$((n+1)); done; %[3]s; echo wire-passes-$((n+0)) $n) &",
			wireStop, wireLoops[w], wireCleanup)
		if err := g.typeLine(loop); err != nil {
			return s, err
		}
		if err := sleepCtx(ctx, g.prim.exited, cfg.Warmup); err != nil {
			return s, err
		}
		t0 = time.Now()
		if m0, err = g.scrape(ctx); err != nil {
			return s, err
		}
		if err := sleepCtx(ctx, g.prim.exited, cfg.Window); err != nil {
			return s, err
		}
	}
	if m1, err = g.scrape(ctx); err != nil {
		return s, err
	}
	s.Span = time.Since(t0)
	if w != WorkloadDemo {
		// Stop the loop: the file ends it, killall cuts its pass short.
		if _, err := g.command(ctx, fmt.Sprintf("touch %s; killall -q tar gzip sort; wait", wireStop), "", 3*time.Minute); err != nil {
			return s, err
		}
		if m := regexp.MustCompile(`wire-passes-\d+ (\d+)`).FindAllStringSubmatch(g.prim.stdout.String(), -1); m != nil {
			s.Work, _ = strconv.Atoi(m[len(m)-1][1])
		}
	}
	c0, err := m0.Counters()
	if err != nil {
		return s, err
	}
	c1, err := m1.Counters()
	if err != nil {
		return s, err
	}
	s.Counters = c1.Sub(c0)
	var ok bool
	if s.Agreed, ok = m1.StreamInfo(); !ok {
		return s, errors.New("the primary's metrics have no govmm_stream_info")
	}
	if s.Counters.DirtyPages <= 0 {
		return s, errors.New("no dirty pages in the window")
	}
	return s, nil
}

// scrape reads the primary's /metrics.
func (g *wireGuest) scrape(ctx context.Context) (Metrics, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", g.metrics, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", g.metrics, resp.Status)
	}
	return ParseMetrics(resp.Body)
}

// sleepCtx waits d, unless ctx ends or the process exits first.
func sleepCtx(ctx context.Context, exited <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C: // the workload's warmup or window: a fixed time
		return nil
	case <-exited:
		return errors.New("govmm exited under load")
	case <-ctx.Done():
		return ctx.Err()
	}
}
