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
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// OverheadGuestConfig parameterises the overhead-guest suite: what
// replication costs the clients of the default guest's demo service,
// where Linux boots (hardware KVM, or the lab).
type OverheadGuestConfig struct {
	Govmm          string          // the govmm binary
	Kernel, Initrd string          // the default guest image
	Epochs         []time.Duration // replicated runs (default 10, 25, 50 and 100ms)
	Trials         int             // per configuration, interleaved (default 3)
	Clients        int             // keep-alive connections driving POST /incr (default 4)
	// Warmup runs after the service answers (and, replicated, the guest
	// is protected); Window is how long requests are counted.
	Warmup, Window time.Duration
	// Timeout is both ends' --failover-timeout (default 3s: the lab).
	Timeout time.Duration
	Out     string
	Log     io.Writer
}

// OverheadGuestSample is one window of HTTP load on one guest.
type OverheadGuestSample struct {
	Epoch    time.Duration // 0: unreplicated
	Trial    int
	Requests int           // answered with 200 inside the window
	Errors   int           // failed or not 200
	Window   time.Duration // measured, first request start to last answer
	P50, P99 time.Duration // latency of the answered requests
	// Replicated: the primary's checkpoints in the window (its metrics
	// read as the window opens and closes): how many, their mean pause,
	// their mean time from resume to the standby's ack, and the share of
	// the window the primary waited on acks (backpressure).
	Epochs                 int
	PauseMean, AckMean     time.Duration
	BackpressureShare      float64
	EpochMean, metricsSpan time.Duration
}

// Rate is the answered requests per second.
func (s OverheadGuestSample) Rate() float64 { return float64(s.Requests) / s.Window.Seconds() }

// OverheadGuestResult is everything the suite measured.
type OverheadGuestResult struct {
	Samples []OverheadGuestSample
	// Failed are the trials that broke (the guest or a VMM died, or
	// never got protected): the suite goes on, keeps their logs in Out
	// and reports them.
	Failed []string
	Config OverheadGuestConfig
}

func (cfg *OverheadGuestConfig) defaults() {
	if len(cfg.Epochs) == 0 {
		cfg.Epochs = []time.Duration{10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond}
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 3
	}
	if cfg.Clients <= 0 {
		cfg.Clients = 4
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 5 * time.Second
	}
	if cfg.Window <= 0 {
		cfg.Window = 20 * time.Second
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 3 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
}

// OverheadGuest boots the default guest with `--net user` and its demo
// service published on a host port, unreplicated and replicated (`govmm
// run --replicate-to` a `govmm standby` over loopback) at each epoch, and
// measures what Clients keep-alive connections driving POST /incr get:
// answers per second and latency. Replicated, every answer leaves the
// primary only once the standby has the checkpoint that produced it
// (output commit), so latency grows with the epoch. Configurations are
// interleaved within each trial; each boots the guest anew.
func OverheadGuest(ctx context.Context, cfg OverheadGuestConfig) (*OverheadGuestResult, error) {
	if cfg.Govmm == "" || cfg.Kernel == "" || cfg.Initrd == "" {
		return nil, errors.New("overhead-guest: the govmm binary and the default guest image are needed")
	}
	cfg.defaults()
	dir, err := os.MkdirTemp("", "govmm-bench-overhead-guest-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	res := &OverheadGuestResult{Config: cfg}
	epochs := append([]time.Duration{0}, cfg.Epochs...)
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, e := range epochs {
			s, err := overheadGuestTrial(ctx, cfg, dir, e, trial)
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			if err != nil {
				f := fmt.Sprintf("%s trial %d: %v", epochName(e), trial, err)
				fmt.Fprintf(cfg.Log, "overhead-guest: FAILED %s\n", f)
				res.Failed = append(res.Failed, f)
				continue
			}
			fmt.Fprintf(cfg.Log, "overhead-guest: %-12s trial %d: %6.1f answers/s, p50 %6.1f ms, p99 %6.1f ms, %d errors\n",
				epochName(e), trial, s.Rate(), msOf(s.P50), msOf(s.P99), s.Errors)
			res.Samples = append(res.Samples, s)
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

func epochName(e time.Duration) string {
	if e == 0 {
		return ModeNone
	}
	return "epoch " + e.String()
}

func epochFile(e time.Duration) string { return strings.ReplaceAll(epochName(e), " ", "-") }

// overheadGuestTrial boots one guest (and its standby if epoch > 0) and
// measures one window of load.
func overheadGuestTrial(ctx context.Context, cfg OverheadGuestConfig, dir string, epoch time.Duration, trial int) (_ OverheadGuestSample, rerr error) {
	s := OverheadGuestSample{Epoch: epoch, Trial: trial}
	var disks [2]string
	for i := range disks {
		disks[i] = filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		if err := blankDisk(disks[i], 64<<20); err != nil {
			return s, err
		}
	}
	port, err := freeLoopbackPort()
	if err != nil {
		return s, err
	}
	sock := filepath.Join(dir, "primary.sock")
	_ = os.Remove(sock)
	args := []string{"run", "--kernel", cfg.Kernel, "--initrd", cfg.Initrd, "--net", "user", "--api-sock", sock,
		"--publish", fmt.Sprintf("127.0.0.1:%d:80", port), "--disk", disks[0]}
	if epoch > 0 {
		sport, err := freeLoopbackPort()
		if err != nil {
			return s, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", sport)
		to := cfg.Timeout.String()
		sb, err := startStandbyProc(ctx, cfg.Govmm, time.Minute, "--listen", addr, "--net", "user", "--disk", disks[1], "--failover-timeout", to)
		if err != nil {
			return s, err
		}
		defer sb.kill()
		defer func() {
			if rerr != nil {
				sb.keepLogs(cfg.Out, fmt.Sprintf("overhead_guest-failed-%s-%d-standby", epochFile(epoch), trial))
			}
		}()
		args = append(args, "--replicate-to", addr, "--epoch", epoch.String(), "--failover-timeout", to)
	}
	prim, err := startProc(cfg.Govmm, args...)
	if err != nil {
		return s, err
	}
	defer prim.kill()
	defer func() {
		if rerr != nil {
			prim.keepLogs(cfg.Out, fmt.Sprintf("overhead_guest-failed-%s-%d-primary", epochFile(epoch), trial))
		}
	}()
	if epoch > 0 {
		if err := waitFor(ctx, prim.stderr, prim.exited, "protected by", 10*time.Minute); err != nil {
			return s, fmt.Errorf("primary: %w", err)
		}
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	if err := awaitHealthy(ctx, &http.Client{Timeout: 2 * time.Second}, base, prim, 200*time.Millisecond, time.Now().Add(10*time.Minute)); err != nil {
		return s, err
	}
	var m0, m1 map[string]float64
	var t0 time.Time
	atStart := func() {
		if epoch > 0 {
			t0, m0 = time.Now(), replicationMetrics(ctx, cfg.Govmm, sock)
		}
	}
	lat, errs, window, err := loadWindow(ctx, base, cfg.Clients, cfg.Warmup, cfg.Window, prim.exited, atStart)
	if epoch > 0 && err == nil {
		m1 = replicationMetrics(ctx, cfg.Govmm, sock)
		s.fillReplication(m0, m1, time.Since(t0))
	}
	if err != nil {
		return s, fmt.Errorf("%w: %s", err, lastLine(prim.stderr.String()))
	}
	s.Requests, s.Errors, s.Window = len(lat), errs, window
	if len(lat) == 0 {
		return s, fmt.Errorf("no answer inside the window (%d errors)", errs)
	}
	slices.Sort(lat)
	s.P50, s.P99 = lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)]
	return s, nil
}

// loadWindow drives POST /incr on clients keep-alive connections for
// warmup+window and returns the latencies of the requests that started
// inside the window and were answered, the failures, and the window as
// measured (first start to last answer).
func loadWindow(ctx context.Context, base string, clients int, warmup, window time.Duration, died <-chan struct{}, atStart func()) ([]time.Duration, int, time.Duration, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	timer := time.AfterFunc(warmup, atStart)
	defer timer.Stop()
	w0, w1 := start.Add(warmup), start.Add(warmup+window)
	var (
		mu          sync.Mutex
		lat         []time.Duration
		errs        int
		first, last time.Time
		wg          sync.WaitGroup
	)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// One connection per client, kept alive.
			c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 1, MaxConnsPerHost: 1}}
			defer c.CloseIdleConnections()
			for ctx.Err() == nil {
				t0 := time.Now()
				if !t0.Before(w1) {
					return
				}
				err := post(ctx, c, base+"/incr")
				t1 := time.Now()
				if t0.Before(w0) {
					continue
				}
				mu.Lock()
				if first.IsZero() || t0.Before(first) {
					first = t0
				}
				if err != nil {
					errs++
				} else {
					lat = append(lat, t1.Sub(t0))
					if t1.After(last) {
						last = t1
					}
				}
				mu.Unlock()
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-died:
		cancel()
		<-done
		return nil, 0, 0, errors.New("govmm exited under load")
	}
	if last.IsZero() {
		return lat, errs, 0, nil
	}
	return lat, errs, last.Sub(first), nil
}

// replicationMetrics reads the primary's govmm_replication_* metrics
// through its control API (nil if it does not answer).
func replicationMetrics(ctx context.Context, govmm, sock string) map[string]float64 {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, govmm, "ctl", "--api-sock", sock, "metrics").Output()
	if err != nil {
		return nil
	}
	m := map[string]float64{}
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 || !strings.HasPrefix(f[0], "govmm_replication_") {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			m[f[0]] = v
		}
	}
	return m
}

// fillReplication derives the window's checkpoint figures from the
// primary's counters at its start (m0) and end (m1), span apart.
func (s *OverheadGuestSample) fillReplication(m0, m1 map[string]float64, span time.Duration) {
	if m0 == nil || m1 == nil {
		return
	}
	d := func(name string) float64 { return m1[name] - m0[name] }
	secs := func(v float64) time.Duration { return time.Duration(v * float64(time.Second)) }
	s.Epochs = int(d("govmm_replication_epochs_total"))
	s.metricsSpan = span
	if s.Epochs > 0 {
		s.PauseMean = secs(d("govmm_replication_pause_seconds_sum") / float64(s.Epochs))
		if acks := d("govmm_replication_ack_seconds_count"); acks > 0 {
			s.AckMean = secs(d("govmm_replication_ack_seconds_sum") / acks)
		}
		s.EpochMean = span / time.Duration(s.Epochs)
	}
	s.BackpressureShare = d("govmm_replication_backpressure_seconds_total") / span.Seconds()
}

func (r *OverheadGuestResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{strconv.FormatFloat(msOf(s.Epoch), 'f', 0, 64), strconv.Itoa(s.Trial),
			strconv.Itoa(s.Requests), strconv.Itoa(s.Errors), ftoa(s.Window.Seconds(), 3), ftoa(s.Rate(), 2),
			ftoa(msOf(s.P50), 3), ftoa(msOf(s.P99), 3), strconv.Itoa(s.Epochs), ftoa(msOf(s.EpochMean), 3),
			ftoa(msOf(s.PauseMean), 3), ftoa(msOf(s.AckMean), 3), ftoa(s.BackpressureShare, 3)})
	}
	if err := writeCSV(filepath.Join(dir, "overhead_guest.csv"), []string{"epoch_ms", "trial", "requests", "errors",
		"window_s", "answers_per_s", "p50_ms", "p99_ms", "checkpoints", "checkpoint_interval_mean_ms", "pause_mean_ms",
		"ack_mean_ms", "backpressure_share"}, rows); err != nil {
		return err
	}
	names, rates, p50s := r.groups()
	if err := boxes(filepath.Join(dir, "overhead_guest_rate.png"), "Default guest's demo service: POST /incr answers per second", "answers/s", false, names, rates); err != nil {
		return err
	}
	return boxes(filepath.Join(dir, "overhead_guest_latency.png"), "Default guest's demo service: POST /incr median latency", "latency (ms)", false, names, p50s)
}

// groups are the configurations in order, with each one's rates and
// median latencies.
func (r *OverheadGuestResult) groups() (names []string, rates, p50s [][]float64) {
	epochs := append([]time.Duration{0}, r.Config.Epochs...)
	for _, e := range epochs {
		var rs, ls []float64
		for _, s := range r.Samples {
			if s.Epoch == e {
				rs = append(rs, s.Rate())
				ls = append(ls, msOf(s.P50))
			}
		}
		names = append(names, epochName(e))
		rates, p50s = append(rates, rs), append(p50s, ls)
	}
	return names, rates, p50s
}

// Report renders the overhead-guest section of report.md.
func (r *OverheadGuestResult) Report() string {
	var b strings.Builder
	c := r.Config
	fmt.Fprintf(&b, "%s\n\nGuest: the default guest (256 MiB, one vCPU, a 64 MiB disk) with `--net user` and its demo service published on a host port, "+
		"booted anew for each configuration; replicated ones run `govmm run --replicate-to` a `govmm standby` over loopback (`--failover-timeout %v`). "+
		"%d keep-alive connections drive POST /incr back to back; after %v of warmup, answers are counted for %v. "+
		"Configurations interleaved within each of %d trials. Raw data `overhead_guest.csv`, plots `overhead_guest_rate.png`, `overhead_guest_latency.png`.\n\n",
		platform(), c.Timeout, c.Clients, c.Warmup, c.Window, c.Trials)
	b.WriteString("*checkpoint interval*, *pause* and *ack* are the primary's own counters over the window (`govmm ctl metrics`): the mean time between checkpoints, " +
		"the mean pause, and the mean time from the resume to the standby's ack; *backpressure* is the share of the window the primary held the guest waiting for acks.\n\n")
	b.WriteString("| configuration | trials | answers/s median | vs unreplicated | p50 latency median ms | p99 latency median ms | errors | checkpoint interval ms | pause ms | ack ms | backpressure |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	var base float64
	epochs := append([]time.Duration{0}, c.Epochs...)
	for _, e := range epochs {
		var rs, p50, p99, iv, pause, ack, bp []float64
		errs := 0
		for _, s := range r.Samples {
			if s.Epoch == e {
				rs, p50, p99 = append(rs, s.Rate()), append(p50, msOf(s.P50)), append(p99, msOf(s.P99))
				iv, pause, ack = append(iv, msOf(s.EpochMean)), append(pause, msOf(s.PauseMean)), append(ack, msOf(s.AckMean))
				bp = append(bp, s.BackpressureShare)
				errs += s.Errors
			}
		}
		if len(rs) == 0 {
			continue
		}
		sr := Summarize(rs)
		if e == 0 {
			base = sr.Median
		}
		ratio := "-"
		if base > 0 {
			ratio = fmt.Sprintf("%.2f×", sr.Median/base)
		}
		repl := "| - | - | - | - |"
		if e > 0 {
			repl = fmt.Sprintf("| %.1f | %.1f | %.1f | %.0f%% |", Summarize(iv).Median, Summarize(pause).Median, Summarize(ack).Median, 100*Summarize(bp).Median)
		}
		fmt.Fprintf(&b, "| %s | %d | %.1f | %s | %.1f | %.1f | %d %s\n", epochName(e), sr.N, sr.Median, ratio, Summarize(p50).Median, Summarize(p99).Median, errs, repl)
	}
	if len(r.Failed) > 0 {
		fmt.Fprintf(&b, "\n%d trial(s) failed and are not in the table (their logs: `overhead_guest-failed-*`):\n\n", len(r.Failed))
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	return b.String()
}
