package bench

import (
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// FailoverGuestConfig parameterises the failover-guest suite: the
// failover suite's question with the default guest and its demo service,
// where Linux boots (hardware KVM, or the lab).
type FailoverGuestConfig struct {
	Govmm          string // the govmm binary
	Kernel, Initrd string // the default guest image (govmm image build)
	Trials         int    // per mode and witness setting (default 3)
	// Modes are the failures timed, FailKill and/or FailStop (default
	// both): a run of only one spends all its boots on it.
	Modes []string
	// Witness are the settings each mode is timed with: without a witness
	// (false) and/or with one (true); default both.
	Witness []bool
	// Timeout is both ends' --failover-timeout and, with a witness, the
	// lease (default 3s: the lab's emulated L1 applies a booting guest's
	// first checkpoints slowly).
	Timeout time.Duration
	Out     string
	Log     io.Writer
}

// FailoverGuestResult is everything the suite measured; its samples are
// the failover suite's, Answer being the first answer of the demo service
// from its new home.
type FailoverGuestResult struct {
	Samples []FailoverSample
	// Failed are the trials that broke before a failover could be timed
	// (a guest or a VMM died, the standby never answered), each with why;
	// their VMMs' logs and consoles are kept beside the results.
	Failed []string
	Config FailoverGuestConfig
	// Merged are the results directories this result was merged from
	// (MergeFailoverGuest), if any, and Platform what those runs said of
	// where they ran (empty: here).
	Merged   []string
	Platform string
}

// FailoverGuest boots the default guest under `govmm run --replicate-to`
// with a `govmm standby`, both on user-mode networking with the demo
// service published on a host port of each (the standby's listens once it
// runs the guest), drives POST /incr on the primary's, then SIGKILLs or
// SIGSTOPs the primary and times the first answer of GET /healthz on the
// standby's port; without a witness and with one (lease = the failover
// timeout). Each trial boots the guest anew.
func FailoverGuest(ctx context.Context, cfg FailoverGuestConfig) (*FailoverGuestResult, error) {
	if cfg.Govmm == "" || cfg.Kernel == "" || cfg.Initrd == "" {
		return nil, errors.New("failover-guest: the govmm binary and the default guest image are needed")
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 3
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = []string{FailKill, FailStop}
	}
	if len(cfg.Witness) == 0 {
		cfg.Witness = []bool{false, true}
	}
	for _, m := range cfg.Modes {
		if m != FailKill && m != FailStop {
			return nil, fmt.Errorf("failover-guest: unknown mode %q (%s or %s)", m, FailKill, FailStop)
		}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	dir, err := os.MkdirTemp("", "govmm-bench-failover-guest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("govmm-bench-failover-key-0123456"), 0o600); err != nil {
		return nil, err
	}
	wit, err := startWitness(ctx, cfg.Govmm, dir, keyFile)
	if err != nil {
		return nil, err
	}
	defer wit.kill()
	res := &FailoverGuestResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, mode := range cfg.Modes {
			for _, w := range cfg.Witness {
				witAddr := ""
				if w {
					witAddr = wit.addr
				}
				s, err := failoverGuestTrial(ctx, cfg, dir, keyFile, witAddr, mode, trial)
				if ctx.Err() != nil {
					return res, ctx.Err()
				}
				if err != nil {
					f := fmt.Sprintf("%s witness %v trial %d: %v", mode, w, trial, err)
					fmt.Fprintf(cfg.Log, "failover-guest: FAILED %s\n", f)
					res.Failed = append(res.Failed, f)
					continue
				}
				fmt.Fprintf(cfg.Log, "failover-guest: %-7s witness %-5v trial %d: first answer after %7.1f ms (takeover %v, claim %v, at epoch %d)\n",
					mode, w, trial, msOf(s.Answer), s.Takeover, s.Claim, s.Epoch)
				res.Samples = append(res.Samples, s)
			}
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	if len(res.Samples) == 0 {
		return res, fmt.Errorf("failover-guest: every trial failed, the first: %s", res.Failed[0])
	}
	return res, nil
}

// freeLoopbackPort is a TCP port free on 127.0.0.1 now.
func freeLoopbackPort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func failoverGuestTrial(ctx context.Context, cfg FailoverGuestConfig, dir, keyFile, witness, mode string, trial int) (s FailoverSample, rerr error) {
	s = FailoverSample{Mode: mode, Timeout: cfg.Timeout, Witness: witness != "", Trial: trial}
	failed := fmt.Sprintf("failover_guest-failed-%s-%v-%d", mode, witness != "", trial)
	var ports [3]int
	for i := range ports {
		p, err := freeLoopbackPort()
		if err != nil {
			return s, err
		}
		ports[i] = p
	}
	streamAddr := fmt.Sprintf("127.0.0.1:%d", ports[0])
	var disks [2]string
	for i := range disks {
		disks[i] = filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := blankDisk(disks[i], 64<<20); err != nil {
			return s, err
		}
	}
	common := replicationFlags(cfg.Timeout, keyFile, fmt.Sprintf("bench-guest-%s-%v-%d", mode, witness != "", trial), witness)
	sb, err := startStandbyProc(ctx, cfg.Govmm, time.Minute, append([]string{"--listen", streamAddr, "--net", "user",
		"--publish", fmt.Sprintf("127.0.0.1:%d:80", ports[2]), "--disk", disks[1]}, common...)...)
	if err != nil {
		return s, err
	}
	defer sb.kill()
	defer func() {
		if rerr != nil {
			sb.keepLogs(cfg.Out, failed+"-standby")
		}
	}()
	prim, err := startProc(cfg.Govmm, append([]string{"run", "--kernel", cfg.Kernel, "--initrd", cfg.Initrd, "--replicate-to", streamAddr, "--net", "user",
		"--publish", fmt.Sprintf("127.0.0.1:%d:80", ports[1]), "--disk", disks[0]}, common...)...)
	if err != nil {
		return s, err
	}
	defer prim.kill()
	defer func() {
		if rerr != nil {
			prim.keepLogs(cfg.Out, failed+"-primary")
		}
	}()
	if err := waitFor(ctx, prim.stderr, prim.exited, "protected by", 10*time.Minute); err != nil {
		return s, fmt.Errorf("primary: %w", err)
	}
	client := &http.Client{Timeout: 2 * time.Second}
	primary := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	if err := awaitHealthy(ctx, client, primary, prim, 200*time.Millisecond, time.Now().Add(10*time.Minute)); err != nil {
		return s, fmt.Errorf("primary: %w", err)
	}
	// Some acknowledged work, so that the standby has checkpoints of a
	// running service.
	for i := 0; i < 20; i++ {
		if err := post(ctx, client, primary+"/incr"); err != nil {
			return s, fmt.Errorf("POST /incr on the primary: %w", err)
		}
	}
	sig := failSignal(mode)
	t0 := time.Now()
	if err := prim.signal(sig); err != nil {
		return s, err
	}
	running := make(chan time.Duration, 1)
	go func() {
		if waitFor(ctx, sb.stderr, sb.exited, "took over at checkpoint", 3*time.Minute) == nil {
			running <- time.Since(t0)
		}
		close(running)
	}()
	standby := fmt.Sprintf("http://127.0.0.1:%d", ports[2])
	// A client that waits: the standby's port takes its connection from
	// the start and relays it once the guest runs there, so a short
	// per-try timeout would measure the timeout (a try given up at 500 ms
	// that would have been answered at 600 ms), not the failover. A try
	// refused or reset retries after 5 ms.
	patient := &http.Client{Timeout: 5 * time.Second}
	if err := awaitHealthy(ctx, patient, standby, sb, 5*time.Millisecond, t0.Add(3*time.Minute)); err != nil {
		return s, fmt.Errorf("standby, after the primary's %v: %w", sig, err)
	}
	s.Answer = time.Since(t0)
	select { // the line comes before the answer, give or take the poll
	case s.Running = <-running:
	case <-time.After(5 * time.Second):
	}
	s.readStandbyLog(sb.stderr.String())
	return s, nil
}

// awaitHealthy polls base's demo service (GET /healthz) every poll until
// it answers, p exits, or deadline passes.
func awaitHealthy(ctx context.Context, c *http.Client, base string, p *proc, poll time.Duration, deadline time.Time) error {
	for {
		if err := get(ctx, c, base+"/healthz"); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest's demo service did not answer at %s by %v: %s", base, deadline.Format(time.TimeOnly), lastLine(p.stderr.String()))
		}
		select {
		case <-p.exited:
			return fmt.Errorf("exited: %s", lastLine(p.stderr.String()))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// blankDisk makes a sparse disk image of size bytes at path.
func blankDisk(path string, size int64) error {
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		return err
	}
	return os.Truncate(path, size)
}

func get(ctx context.Context, c *http.Client, url string) error  { return do(ctx, c, "GET", url) }
func post(ctx context.Context, c *http.Client, url string) error { return do(ctx, c, "POST", url) }

func do(ctx context.Context, c *http.Client, method, url string) error {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s", method, url, resp.Status)
	}
	return nil
}

func (r *FailoverGuestResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{s.Mode, strconv.FormatBool(s.Witness), strconv.Itoa(s.Trial), ftoa(msOf(s.Answer), 3),
			ftoa(msOf(s.Takeover), 3), ftoa(msOf(s.Claim), 3), strconv.FormatUint(s.Epoch, 10), s.Cause, ftoa(msOf(s.Timeout), 0), ftoa(msOf(s.Running), 3)})
	}
	if err := writeCSV(filepath.Join(dir, failoverGuestCSV), failoverGuestColumns, rows); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, failoverGuestPlatform), []byte(r.platform()+"\n"), 0o644); err != nil {
		return err
	}
	if len(r.Failed) > 0 {
		if err := os.WriteFile(filepath.Join(dir, failoverGuestFailed), []byte(strings.Join(r.Failed, "\n")+"\n"), 0o644); err != nil {
			return err
		}
	}
	var names []string
	var values [][]float64
	for _, mode := range []string{FailKill, FailStop} {
		for _, w := range []bool{false, true} {
			var v []float64
			for _, s := range r.Samples {
				if s.Mode == mode && s.Witness == w {
					v = append(v, msOf(s.Answer))
				}
			}
			if len(v) == 0 {
				continue
			}
			name := mode
			if w {
				name += ", witness"
			}
			names = append(names, name)
			values = append(values, v)
		}
	}
	return boxes(filepath.Join(dir, "failover_guest.png"), "Default guest: primary failure to the first answer from the standby", "time (ms)", true, names, values)
}

// Report renders the failover-guest section of report.md.
func (r *FailoverGuestResult) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nGuest: the default guest (256 MiB, one vCPU, a 64 MiB disk), booted anew for each trial under `govmm run --replicate-to` with a `govmm standby`, "+
		"both with `--net user` and the demo service published on a host port of each, `--failover-timeout %v` and a pre-shared key; *witness* trials add `--witness` "+
		"(a `govmm witness` on loopback) with `--witness-lease %v`. After 20 POST /incr on the primary, its process group is SIGKILLed or SIGSTOPped and GET /healthz "+
		"is polled on the standby's port (5 s timeout per try, again 5 ms after a try that fails) until it answers. *running* is from the signal until the standby's log says it took over (its detection of the loss, then the takeover; the bench reads the log as it comes, every 2 ms), *reach* the rest of the first answer: the client reaching the resumed guest. *takeover* and *claim* are what the standby logs. Raw data `failover_guest.csv`, plot `failover_guest.png`.\n\n",
		r.platform(), r.Config.Timeout, r.Config.Timeout)
	if len(r.Merged) > 0 {
		fmt.Fprintf(&b, "Merged from %d runs, each in an L1 of its own (in the lab an L1 may die before a long run ends): `%s`.\n\n",
			len(r.Merged), strings.Join(r.Merged, "`, `"))
	}
	b.WriteString("| mode | witness | trials | first answer median ms | min | max | running median ms | reach median ms | takeover median ms | claim median ms |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, mode := range []string{FailKill, FailStop} {
		for _, w := range []bool{false, true} {
			var a, run, reach, tk, cl []float64
			for _, s := range r.Samples {
				if s.Mode == mode && s.Witness == w {
					a = append(a, msOf(s.Answer))
					if s.Running > 0 {
						run = append(run, msOf(s.Running))
						reach = append(reach, msOf(s.Answer-s.Running))
					}
					tk = append(tk, msOf(s.Takeover))
					cl = append(cl, msOf(s.Claim))
				}
			}
			if len(a) == 0 {
				continue
			}
			yes := "no"
			if w {
				yes = "yes"
			}
			sa := Summarize(a)
			fmt.Fprintf(&b, "| %s | %s | %d | %.0f | %.0f | %.0f | %s | %s | %.0f | %.0f |\n", mode, yes, sa.N, sa.Median, sa.Min, sa.Max,
				medianOrNone(run), medianOrNone(reach), Summarize(tk).Median, Summarize(cl).Median)
		}
	}
	if len(r.Failed) > 0 {
		fmt.Fprintf(&b, "\n%d trial(s) failed and are not in the table (their logs: `failover_guest-failed-*`):\n\n", len(r.Failed))
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	return b.String()
}

// The failover-guest suite's files: one row per timed trial, and the
// trials that failed, one per line.
const (
	failoverGuestCSV      = "failover_guest.csv"
	failoverGuestFailed   = "failover_guest_failed.txt"
	failoverGuestPlatform = "failover_guest_platform.txt" // where it ran (platform())
)

// platform is where the trials ran: here, or where the merged runs did.
func (r *FailoverGuestResult) platform() string {
	if r.Platform != "" {
		return r.Platform
	}
	return platform()
}

var failoverGuestColumns = []string{"mode", "witness", "trial", "answer_ms", "takeover_ms", "claim_ms", "resumed_epoch", "cause", "timeout_ms", "running_ms"}

// MergeFailoverGuest reads the failover-guest results of several runs
// (each dir a run's results directory) into one result, written to out:
// where one L1 may die before a long run ends (the lab), the trials are
// run in several short runs, each in its own L1, and merged. Trials are
// renumbered in order per mode and witness setting; all runs must have
// used the same failover timeout.
func MergeFailoverGuest(dirs []string, out string) (*FailoverGuestResult, error) {
	res := &FailoverGuestResult{Merged: dirs}
	next := map[string]int{}
	for _, dir := range dirs {
		samples, err := readFailoverGuestCSV(filepath.Join(dir, failoverGuestCSV))
		if errors.Is(err, os.ErrNotExist) {
			// A run that ended before it wrote anything (its L1 died
			// more often than it was retried): said, not hidden.
			res.Failed = append(res.Failed, fmt.Sprintf("%s: no results: the run ended before it wrote any", filepath.Base(dir)))
			continue
		}
		if err != nil {
			return nil, err
		}
		for _, s := range samples {
			if res.Config.Timeout == 0 {
				res.Config.Timeout = s.Timeout
			} else if s.Timeout != res.Config.Timeout {
				return nil, fmt.Errorf("merge: %s ran with a failover timeout of %v, the others %v", dir, s.Timeout, res.Config.Timeout)
			}
			key := fmt.Sprint(s.Mode, s.Witness)
			next[key]++
			s.Trial = next[key]
			res.Samples = append(res.Samples, s)
		}
		p, err := os.ReadFile(filepath.Join(dir, failoverGuestPlatform))
		if err != nil {
			return nil, err
		}
		if res.Platform == "" {
			res.Platform = strings.TrimSpace(string(p))
		} else if strings.TrimSpace(string(p)) != res.Platform {
			return nil, fmt.Errorf("merge: %s ran elsewhere than the others (%s)", dir, strings.TrimSpace(string(p)))
		}
		if b, err := os.ReadFile(filepath.Join(dir, failoverGuestFailed)); err == nil {
			for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
				res.Failed = append(res.Failed, fmt.Sprintf("%s: %s", filepath.Base(dir), l))
			}
		}
	}
	if len(res.Samples) == 0 {
		return nil, errors.New("merge: no failover-guest trials in those directories")
	}
	return res, res.write(out)
}

func readFailoverGuestCSV(path string) ([]FailoverSample, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(rows) == 0 || !slices.Equal(rows[0], failoverGuestColumns) {
		return nil, fmt.Errorf("%s: not a failover-guest CSV of this version (columns %v)", path, failoverGuestColumns)
	}
	var out []FailoverSample
	for i, r := range rows[1:] {
		var s FailoverSample
		var ms [5]float64
		for j, col := range []int{3, 4, 5, 8, 9} {
			if ms[j], err = strconv.ParseFloat(r[col], 64); err != nil {
				return nil, fmt.Errorf("%s: row %d: %s: %w", path, i+2, failoverGuestColumns[col], err)
			}
		}
		s.Mode, s.Cause = r[0], r[7]
		s.Witness = r[1] == "true"
		s.Trial, _ = strconv.Atoi(r[2])
		s.Epoch, _ = strconv.ParseUint(r[6], 10, 64)
		s.Answer, s.Takeover, s.Claim, s.Timeout, s.Running = fromMs(ms[0]), fromMs(ms[1]), fromMs(ms[2]), fromMs(ms[3]), fromMs(ms[4])
		out = append(out, s)
	}
	return out, nil
}

func fromMs(ms float64) time.Duration { return time.Duration(ms * float64(time.Millisecond)) }

// medianOrNone is the median of v in whole ms, or "-" where nothing was
// measured.
func medianOrNone(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", Summarize(v).Median)
}
