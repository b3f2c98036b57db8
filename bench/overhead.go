package bench

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"govmm/replicate"
	"govmm/vmm"
)

// Replication modes of the overhead suite.
const (
	ModeNone     = "unreplicated" // the baseline: no checkpoints
	ModeNull     = "null"         // checkpoints taken, shipped nowhere (replicate.NewNullTransport)
	ModeLoopback = "loopback"     // checkpoints shipped to an in-process standby over loopback TCP
)

// OverheadConfig parameterises the overhead suite.
type OverheadConfig struct {
	// Pages are the Dirtier working sets (default 256 and 4096).
	Pages []int
	// Epochs are the epoch lengths tried with each replicated mode
	// (default 10, 25, 50 and 100ms).
	Epochs []time.Duration
	// Trials per configuration, interleaved across configurations.
	Trials int
	// Warmup runs after the guest is up (and, replicated, protected)
	// before the window opens; Window is how long throughput is measured.
	Warmup, Window time.Duration
	Out            string
	Log            io.Writer
}

// OverheadSample is one measurement of guest throughput.
type OverheadSample struct {
	Pages  int
	Mode   string        // ModeNone, ModeNull or ModeLoopback
	Epoch  time.Duration // 0 for ModeNone
	Trial  int
	Passes uint64        // whole Dirtier passes in the window
	Time   time.Duration // the window, from one pass boundary to another
	// Replicated modes: the checkpoints taken in the window.
	Epochs                int
	PauseMedian, PauseSum time.Duration
	DirtyMedian           float64
	Bytes                 uint64
	LengthMedian          time.Duration // actual epoch length (previous resume to this pause)
	AckMedian             time.Duration // ModeLoopback: resume to the standby's ack
}

// Rate is the guest's throughput in passes per second.
func (s OverheadSample) Rate() float64 {
	if s.Time <= 0 {
		return 0
	}
	return float64(s.Passes) / s.Time.Seconds()
}

// OverheadResult is everything the suite measured.
type OverheadResult struct {
	Samples []OverheadSample
	Config  OverheadConfig
}

type overheadPoint struct {
	mode  string
	epoch time.Duration
}

// Overhead measures the guest-visible cost of replication: the tiny
// Dirtier's passes per second unreplicated, replicated to NullStandby
// and replicated over loopback, for each working set and epoch length.
// Every measurement runs a fresh guest, so no dirty-logging state
// carries from one configuration to the next.
func Overhead(ctx context.Context, cfg OverheadConfig) (*OverheadResult, error) {
	if len(cfg.Pages) == 0 {
		cfg.Pages = []int{256, 4096}
	}
	if len(cfg.Epochs) == 0 {
		cfg.Epochs = []time.Duration{10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond}
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 3
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 500 * time.Millisecond
	}
	if cfg.Window <= 0 {
		cfg.Window = 3 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	points := []overheadPoint{{ModeNone, 0}}
	for _, mode := range []string{ModeNull, ModeLoopback} {
		for _, e := range cfg.Epochs {
			points = append(points, overheadPoint{mode, e})
		}
	}
	res := &OverheadResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, pages := range cfg.Pages {
			// Interleaved, and rotated each trial so that no configuration
			// always runs first or last.
			for i := range points {
				p := points[(i+trial-1)%len(points)]
				s, err := overheadTrial(ctx, cfg, pages, p)
				if err != nil {
					return res, fmt.Errorf("overhead %d pages, %s %v, trial %d: %w", pages, p.mode, p.epoch, trial, err)
				}
				s.Trial = trial
				epoch := "–"
				if p.mode != ModeNone {
					epoch = p.epoch.String()
				}
				fmt.Fprintf(cfg.Log, "overhead: %5d pages %-12s %6s trial %d: %7.1f passes/s, %4d epochs, pause median %6.0f µs\n",
					pages, p.mode, epoch, trial, s.Rate(), s.Epochs, usOf(s.PauseMedian))
				res.Samples = append(res.Samples, s)
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

// overheadTrial runs one fresh guest in configuration p and measures its
// throughput over cfg.Window after cfg.Warmup. (Long, on purpose: it is
// one experiment read top to bottom, setup, warm-up, the timed window
// between two pass edges, and the epochs inside that window.)
func overheadTrial(ctx context.Context, cfg OverheadConfig, pages int, p overheadPoint) (OverheadSample, error) {
	s := OverheadSample{Pages: pages, Mode: p.mode, Epoch: p.epoch}
	m, err := newTinyMachine(pages, memFor(pages))
	if err != nil {
		return s, err
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		return s, err
	}
	if err := waitPasses(ctx, m, 1, time.Minute); err != nil {
		return s, err
	}
	var rep *replicate.Replicator
	if p.mode != ModeNone {
		cfg := replicate.ReplicateConfig{Insecure: true, Name: "bench", Epoch: p.epoch, FailoverTimeout: 10 * time.Second,
			Logger: quietLogger(), Transport: replicate.NewNullTransport()}
		if p.mode == ModeLoopback {
			sb, err := startStandby(ctx, nil)
			if err != nil {
				return s, err
			}
			defer sb.stop() // after rep.Stop, which is deferred later
			cfg.To, cfg.Transport = sb.addr, nil
		}
		rep, err = replicate.StartReplication(ctx, m, cfg)
		if err != nil {
			return s, err
		}
		defer rep.Stop()
	}
	select {
	case <-ctx.Done():
		return s, ctx.Err()
	case <-time.After(cfg.Warmup):
	}
	// The window runs from one pass boundary to another, so that no
	// partial pass is counted.
	p0, t0, err := passEdge(ctx, m, time.Minute)
	if err != nil {
		return s, err
	}
	var e0 uint64
	if rep != nil {
		e0 = rep.Stats().Epoch
	}
	select {
	case <-ctx.Done():
		return s, ctx.Err()
	case <-time.After(cfg.Window):
	}
	p1, t1, err := passEdge(ctx, m, time.Minute)
	if err != nil {
		return s, err
	}
	s.Passes, s.Time = p1-p0, t1.Sub(t0)
	if rep == nil {
		return s, nil
	}
	e1 := rep.Stats().Epoch
	select {
	case <-rep.Done():
		return s, fmt.Errorf("replication ended: %w", rep.Err())
	default:
	}
	time.Sleep(p.epoch) // acks in flight arrive
	var pause, dirty, length, ack []float64
	for _, es := range rep.Recent() {
		if es.Epoch <= e0 || es.Epoch > e1 {
			continue
		}
		s.Epochs++
		s.PauseSum += es.Pause
		s.Bytes += es.Bytes
		pause = append(pause, float64(es.Pause))
		dirty = append(dirty, float64(es.DirtyPages))
		length = append(length, float64(es.Length))
		if es.AckTime > 0 {
			ack = append(ack, float64(es.AckTime))
		}
	}
	if s.Epochs > 0 {
		s.PauseMedian = time.Duration(Summarize(pause).Median)
		s.DirtyMedian = Summarize(dirty).Median
		s.LengthMedian = time.Duration(Summarize(length).Median)
	}
	if len(ack) > 0 {
		s.AckMedian = time.Duration(Summarize(ack).Median)
	}
	return s, nil
}

// passEdge waits for the guest's pass counter to move and returns the
// new count and when it was seen (polled every 100 µs or so).
func passEdge(ctx context.Context, m *vmm.Machine, timeout time.Duration) (uint64, time.Time, error) {
	start := passes(m)
	deadline := time.Now().Add(timeout)
	for {
		if n := passes(m); n != start {
			return n, time.Now(), nil
		}
		if time.Now().After(deadline) {
			return 0, time.Time{}, fmt.Errorf("guest made no pass in %v", timeout)
		}
		if err := ctx.Err(); err != nil {
			return 0, time.Time{}, err
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// overheadGroup is the trials of one (working set, mode, epoch).
type overheadGroup struct {
	pages                        int
	mode                         string
	epoch                        time.Duration
	n                            int
	rate, rel                    Summary // rel: each trial ÷ the baseline median
	epochs, pause, paused, dirty Summary // paused: share of the window the guest was stopped (%)
	length, ack                  Summary
}

func (r *OverheadResult) groups() []overheadGroup {
	type key struct {
		pages int
		mode  string
		epoch time.Duration
	}
	var keys []key
	by := map[key][]OverheadSample{}
	for _, s := range r.Samples {
		k := key{s.Pages, s.Mode, s.Epoch}
		if _, ok := by[k]; !ok {
			keys = append(keys, k)
		}
		by[k] = append(by[k], s)
	}
	// Baseline first, then null, then loopback, each by epoch; working
	// sets in the configured order.
	rank := map[string]int{ModeNone: 0, ModeNull: 1, ModeLoopback: 2}
	pageRank := map[int]int{}
	for i, p := range r.Config.Pages {
		pageRank[p] = i
	}
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0; j-- {
			a, b := keys[j-1], keys[j]
			less := pageRank[b.pages] < pageRank[a.pages] ||
				(b.pages == a.pages && (rank[b.mode] < rank[a.mode] || (b.mode == a.mode && b.epoch < a.epoch)))
			if !less {
				break
			}
			keys[j-1], keys[j] = b, a
		}
	}
	baseline := map[int]float64{}
	for _, k := range keys {
		if k.mode == ModeNone {
			var rates []float64
			for _, s := range by[k] {
				rates = append(rates, s.Rate())
			}
			baseline[k.pages] = Summarize(rates).Median
		}
	}
	var out []overheadGroup
	for _, k := range keys {
		var rate, rel, epochs, pause, paused, dirty, length, ack []float64
		for _, s := range by[k] {
			rate = append(rate, s.Rate())
			if b := baseline[k.pages]; b > 0 {
				rel = append(rel, s.Rate()/b)
			}
			if k.mode == ModeNone {
				continue
			}
			epochs = append(epochs, float64(s.Epochs))
			if s.Epochs > 0 {
				pause = append(pause, usOf(s.PauseMedian))
				dirty = append(dirty, s.DirtyMedian)
				length = append(length, msOf(s.LengthMedian))
			}
			if s.Time > 0 {
				paused = append(paused, 100*float64(s.PauseSum)/float64(s.Time))
			}
			if s.AckMedian > 0 {
				ack = append(ack, usOf(s.AckMedian))
			}
		}
		out = append(out, overheadGroup{pages: k.pages, mode: k.mode, epoch: k.epoch, n: len(by[k]), rate: Summarize(rate), rel: Summarize(rel),
			epochs: Summarize(epochs), pause: Summarize(pause), paused: Summarize(paused), dirty: Summarize(dirty),
			length: Summarize(length), ack: Summarize(ack)})
	}
	return out
}

func (r *OverheadResult) write(dir string) error {
	baseline := map[int]float64{}
	for _, g := range r.groups() {
		if g.mode == ModeNone {
			baseline[g.pages] = g.rate.Median
		}
	}
	var rows [][]string
	for _, s := range r.Samples {
		rel := ""
		if b := baseline[s.Pages]; b > 0 {
			rel = ftoa(s.Rate()/b, 4)
		}
		rows = append(rows, []string{strconv.Itoa(s.Pages), s.Mode, ftoa(msOf(s.Epoch), 1), strconv.Itoa(s.Trial),
			strconv.FormatUint(s.Passes, 10), ftoa(msOf(s.Time), 3), ftoa(s.Rate(), 2), rel, strconv.Itoa(s.Epochs),
			ftoa(usOf(s.PauseMedian), 1), ftoa(msOf(s.PauseSum), 3), ftoa(s.DirtyMedian, 0), ftoa(msOf(s.LengthMedian), 3),
			ftoa(usOf(s.AckMedian), 1), strconv.FormatUint(s.Bytes, 10)})
	}
	if err := writeCSV(filepath.Join(dir, "overhead.csv"), []string{"working_set_pages", "mode", "epoch_ms", "trial",
		"passes", "window_ms", "passes_per_s", "relative_to_baseline_median", "epochs", "pause_median_us", "pause_sum_ms",
		"dirty_pages_median", "epoch_length_median_ms", "ack_median_us", "bytes"}, rows); err != nil {
		return err
	}
	return r.plot(dir)
}

func (r *OverheadResult) plot(dir string) error {
	type key struct {
		pages int
		mode  string
	}
	var order []key
	lines := map[key]*Series{}
	for _, g := range r.groups() {
		if g.mode == ModeNone {
			continue
		}
		k := key{g.pages, g.mode}
		if lines[k] == nil {
			name := fmt.Sprintf("%d pages, shipped over loopback", g.pages)
			if g.mode == ModeNull {
				name = fmt.Sprintf("%d pages, null (not shipped)", g.pages)
			}
			lines[k] = &Series{Name: name, Line: true, Dashed: g.mode == ModeNull}
			order = append(order, k)
		}
		lines[k].X = append(lines[k].X, msOf(g.epoch))
		lines[k].Y = append(lines[k].Y, g.rel.Median)
		// Error bars: the lowest and highest trial.
		lines[k].Lo = append(lines[k].Lo, g.rel.Min)
		lines[k].Hi = append(lines[k].Hi, g.rel.Max)
	}
	var series []Series
	var xmin, xmax float64
	for _, k := range order {
		for _, x := range lines[k].X {
			if xmin == 0 || x < xmin {
				xmin = x
			}
			if x > xmax {
				xmax = x
			}
		}
		series = append(series, *lines[k])
	}
	series = append(series, Series{Name: "unreplicated (= 1)", X: []float64{xmin, xmax}, Y: []float64{1, 1}, Line: true, Dashed: true})
	return lineChart(filepath.Join(dir, "overhead.png"), "Guest throughput under replication vs epoch length",
		"epoch length (ms, log scale)", "throughput relative to unreplicated (median; bars: min–max of trials)", Axes{LogX: true}, series)
}

// Report renders the overhead section of report.md.
func (r *OverheadResult) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nThe Remus paper's kernel-build figure, with a synthetic CPU+memory workload: guest throughput under replication against epoch length. "+
		"Guest: one vCPU running `tinyguest.Dirtier` over the working set (writes one byte in each page, then counts a pass); *throughput* is passes per second "+
		"from its pass counter, over a window of %v measured from one pass boundary to another, after the guest is up (replicated: protected) and %v of warm-up. "+
		"Every measurement boots a fresh guest. *unreplicated* is the baseline; *null* replicates through `replicate.NewNullTransport()` (checkpoints taken, shipped nowhere, acked at once), "+
		"*loopback* to an in-process `replicate.Standby` over loopback TCP; null against loopback separates the checkpoint's cost from the transfer's. "+
		"%d trials per configuration, interleaved across configurations (the order rotated each trial). "+
		"*Relative* is each trial's passes/s ÷ the median unreplicated passes/s of the same working set: median (min–max). "+
		"*Paused* is the summed checkpoint pause over the window; the rest of the loss is the guest running slower between checkpoints (dirty-logging write faults, host CPU taken by the checkpoint and stream goroutines). "+
		"Raw data `overhead.csv` (one row per trial), plot `overhead.png` (log epoch axis; error bars: the slowest and fastest trial).\n\n",
		platform(), r.Config.Window, r.Config.Warmup, r.Config.Trials)
	b.WriteString("| working set | mode | epoch | trials | passes/s median (min–max) | relative median (min–max) | epochs in window median | pause median µs | paused % of window | dirty pages/epoch median | actual epoch ms | ack median µs |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, g := range r.groups() {
		epoch, rest := "–", "| – | – | – | – | – | – |"
		if g.mode != ModeNone {
			epoch = g.epoch.String()
			ack := "–"
			if g.mode == ModeLoopback {
				ack = fmt.Sprintf("%.0f", g.ack.Median)
			}
			rest = fmt.Sprintf("| %.0f | %.0f | %.1f | %.0f | %.1f | %s |", g.epochs.Median, g.pause.Median, g.paused.Median, g.dirty.Median, g.length.Median, ack)
		}
		fmt.Fprintf(&b, "| %d | %s | %s | %d | %.1f (%.1f–%.1f) | %.3f (%.3f–%.3f) %s\n", g.pages, g.mode, epoch, g.n,
			g.rate.Median, g.rate.Min, g.rate.Max, g.rel.Median, g.rel.Min, g.rel.Max, rest)
	}
	b.WriteString("\n**Output buffering is not exercised.** In Remus the other guest-visible cost is network output held until its checkpoint is acknowledged " +
		"(up to one epoch plus the ack of added latency per reply). A tiny guest has no NIC driver, so it sends no packets and that cost cannot be measured here; " +
		"only the CPU+memory cost is. For the network workloads of a real guest, `govmm run --unsafe-no-output-buffering` (benchmarks only: clients may see output a failover forgets) " +
		"releases output at once, so the same run with and without it separates buffering latency from checkpoint cost.\n")
	return b.String()
}
