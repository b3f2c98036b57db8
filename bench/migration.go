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
)

// MigrationConfig parameterises the migration suite.
type MigrationConfig struct {
	// Pages are the working sets (0 is the Counter guest, which dirties
	// one page); the tiny guest has no rate knob, so the working set is
	// what varies its dirtying.
	Pages  []int
	Trials int
	MemMiB int // guest RAM, the same for every working set (default 128)
	// StopPages and MaxRounds are passed to replicate.Migrate (0: its
	// defaults).
	StopPages, MaxRounds int
	Out                  string
	Log                  io.Writer
}

// MigrationSample is one live migration.
type MigrationSample struct {
	Pages, Trial        int
	TotalTime, Downtime time.Duration
	Rounds              int
	BytesSent           uint64
	PagesSent           uint64
	// DirtyRate is pages found dirty per second of pre-copy (the dirty
	// log's count, so at most the working set per round); WriteRate is page writes per second from the guest's pass
	// counter while it was migrated.
	DirtyRate, WriteRate float64
	FinalPages           uint64 // pages in the stop-and-copy checkpoint
}

// MigrationResult is everything the suite measured.
type MigrationResult struct {
	Samples []MigrationSample
	Config  MigrationConfig
}

// Migration live-migrates a tiny guest over loopback to an in-process
// destination, for each working set, Trials times.
func Migration(ctx context.Context, cfg MigrationConfig) (*MigrationResult, error) {
	if len(cfg.Pages) == 0 {
		cfg.Pages = []int{0, 256, 4096, 16384}
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 5
	}
	if cfg.MemMiB <= 0 {
		cfg.MemMiB = int(memFor(maxInt(cfg.Pages)) >> 20)
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	res := &MigrationResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, pages := range cfg.Pages {
			s, err := migrationTrial(ctx, cfg, pages)
			if err != nil {
				return res, fmt.Errorf("migration %d pages, trial %d: %w", pages, trial, err)
			}
			s.Trial = trial
			fmt.Fprintf(cfg.Log, "migration: %5d pages trial %d: total %8.1f ms, downtime %7.2f ms, %2d rounds, dirty rate %.0f pages/s\n",
				pages, trial, msOf(s.TotalTime), msOf(s.Downtime), s.Rounds, s.DirtyRate)
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

func migrationTrial(ctx context.Context, cfg MigrationConfig, pages int) (MigrationSample, error) {
	s := MigrationSample{Pages: pages}
	src, err := newTinyMachine(pages, uint64(cfg.MemMiB)<<20)
	if err != nil {
		return s, err
	}
	defer src.Close()
	if err := src.Start(); err != nil {
		return s, err
	}
	if err := waitPasses(ctx, src, 2, time.Minute); err != nil {
		return s, err
	}
	sb, err := newStandby()
	if err != nil {
		return s, err
	}
	defer sb.Close()
	type received struct {
		err error
	}
	done := make(chan received, 1)
	go func() {
		m, _, err := sb.ReceiveMigration(ctx)
		if err == nil {
			m.Close()
		}
		done <- received{err}
	}()
	var dirtyPages uint64
	var precopy time.Duration
	start := time.Now()
	last := start
	p0 := passes(src)
	res, err := replicate.Migrate(ctx, src, replicate.MigrateConfig{To: sb.Addr(), Insecure: true, Name: "bench",
		StopPages: cfg.StopPages, MaxRounds: cfg.MaxRounds,
		Progress: func(p replicate.Progress) {
			now := time.Now()
			switch p.Phase {
			case "precopy":
				// What a round finds dirty was written while it was sent.
				dirtyPages += p.DirtyPages
				precopy += now.Sub(last)
				last = now
			case "stop-and-copy":
				s.FinalPages = p.RemainingPages
			}
		}})
	elapsed := time.Since(start)
	p1 := passes(src)
	if err != nil {
		return s, err
	}
	if r := <-done; r.err != nil {
		return s, r.err
	}
	s.TotalTime, s.Downtime, s.Rounds, s.BytesSent, s.PagesSent = res.TotalTime, res.Downtime, res.Rounds, res.BytesSent, res.PagesSent
	if precopy > 0 {
		s.DirtyRate = float64(dirtyPages) / precopy.Seconds()
	}
	writes := uint64(pages)
	if pages == 0 {
		writes = 1
	}
	s.WriteRate = float64((p1-p0)*writes) / elapsed.Seconds()
	return s, nil
}

func (r *MigrationResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{strconv.Itoa(s.Pages), strconv.Itoa(s.Trial), ftoa(msOf(s.TotalTime), 3), ftoa(msOf(s.Downtime), 3),
			strconv.Itoa(s.Rounds), strconv.FormatUint(s.BytesSent, 10), strconv.FormatUint(s.PagesSent, 10),
			strconv.FormatUint(s.FinalPages, 10), ftoa(s.DirtyRate, 0), ftoa(s.WriteRate, 0)})
	}
	if err := writeCSV(filepath.Join(dir, "migration.csv"), []string{"working_set_pages", "trial", "total_ms", "downtime_ms", "rounds",
		"bytes_sent", "pages_sent", "final_pages", "dirty_rate_pages_per_s", "write_rate_pages_per_s"}, rows); err != nil {
		return err
	}
	// x: the measured dirty rate. A rate below 1 page/s (a guest that
	// dirtied nothing measurable) is drawn at 1 so that the log axis can
	// hold it, and the label says so only when that happened: the Counter
	// guest's own rate is measured (about 10 pages/s) and drawn where it is.
	var tx, ty, dx, dy, mtx, mty, mdx, mdy []float64
	clamped := false
	atLeast1 := func(x float64) float64 {
		if x < 1 {
			clamped = true
			return 1
		}
		return x
	}
	for _, s := range r.Samples {
		x := atLeast1(s.DirtyRate)
		tx, ty = append(tx, x), append(ty, msOf(s.TotalTime))
		dx, dy = append(dx, x), append(dy, msOf(s.Downtime))
	}
	for _, g := range r.groups() {
		x := atLeast1(g.dirty.Median)
		mtx, mty = append(mtx, x), append(mty, g.total.Median)
		mdx, mdy = append(mdx, x), append(mdy, g.down.Median)
	}
	xlabel := "measured dirty rate (pages/s)"
	if clamped {
		xlabel = "measured dirty rate (pages/s; rates below 1 drawn at 1)"
	}
	return lineChart(filepath.Join(dir, "migration.png"), "Live migration vs guest dirty rate (loopback)",
		xlabel, "time (ms)", LogLog, []Series{
			{Name: "total time (each trial)", X: tx, Y: ty},
			{Name: "total time (median)", X: mtx, Y: mty, Line: true},
			{Name: "downtime (each trial)", X: dx, Y: dy},
			{Name: "downtime (median)", X: mdx, Y: mdy, Line: true},
		})
}

type migrationGroup struct {
	pages                             int
	n                                 int
	total, down, dirty, write, rounds Summary
	final, mib                        Summary
}

func (r *MigrationResult) groups() []migrationGroup {
	by := map[int][]MigrationSample{}
	var order []int
	for _, s := range r.Samples {
		if _, ok := by[s.Pages]; !ok {
			order = append(order, s.Pages)
		}
		by[s.Pages] = append(by[s.Pages], s)
	}
	var out []migrationGroup
	for _, p := range order {
		var total, down, dirty, write, rounds, final, mib []float64
		for _, s := range by[p] {
			total = append(total, msOf(s.TotalTime))
			down = append(down, msOf(s.Downtime))
			dirty = append(dirty, s.DirtyRate)
			write = append(write, s.WriteRate)
			rounds = append(rounds, float64(s.Rounds))
			final = append(final, float64(s.FinalPages))
			mib = append(mib, float64(s.BytesSent)/(1<<20))
		}
		out = append(out, migrationGroup{pages: p, n: len(by[p]), total: Summarize(total), down: Summarize(down), dirty: Summarize(dirty),
			write: Summarize(write), rounds: Summarize(rounds), final: Summarize(final), mib: Summarize(mib)})
	}
	return out
}

// Report renders the migration section of report.md.
func (r *MigrationResult) Report() string {
	var b strings.Builder
	stop, rounds := "256 (default)", "30 (default)"
	if r.Config.StopPages > 0 {
		stop = strconv.Itoa(r.Config.StopPages)
	}
	if r.Config.MaxRounds > 0 {
		rounds = strconv.Itoa(r.Config.MaxRounds)
	}
	fmt.Fprintf(&b, "%s\n\nGuest: one vCPU, %d MiB, running `tinyguest.Counter` (working set 0: one page) or `tinyguest.Dirtier` over the working set; "+
		"`replicate.Migrate` over loopback TCP to an in-process `Standby.ReceiveMigration`, stop-and-copy at ≤ %s dirty pages or after %s rounds. "+
		"The tiny guest has no rate knob, so the working set varies its dirtying; the *dirty rate* is measured from the dirty log during pre-copy "+
		"(pages found dirty after each pre-copy round, summed, over the pre-copy time; a page dirtied many times in a round counts once, so it saturates at working set / round time), the *write rate* from the guest's pass counter. "+
		"%d trials per working set, interleaved. Raw data `migration.csv`, plot `migration.png`.\n\n",
		platform(), r.Config.MemMiB, stop, rounds, r.Config.Trials)
	b.WriteString("| working set (pages) | trials | dirty rate median (pages/s) | write rate median (pages/s) | rounds median | final pages median | MiB sent median | total median ms (p25–p75) | downtime median ms (p25–p75) | downtime min–max ms |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, g := range r.groups() {
		fmt.Fprintf(&b, "| %d | %d | %.0f | %.0f | %.0f | %.0f | %.1f | %.1f (%.1f–%.1f) | %.2f (%.2f–%.2f) | %.2f–%.2f |\n",
			g.pages, g.n, g.dirty.Median, g.write.Median, g.rounds.Median, g.final.Median, g.mib.Median,
			g.total.Median, g.total.P25, g.total.P75, g.down.Median, g.down.P25, g.down.P75, g.down.Min, g.down.Max)
	}
	b.WriteString("\n**No QEMU comparison.** A fair one migrates the same dirtying guest under both VMMs. Under kvm_pvm a Linux guest " +
		"(the default image's dirtier, which QEMU could boot too) takes hours to boot, so QEMU's live migration is not feasible here in reasonable time; " +
		"the tiny dirtiers have only govmm's 64-bit entry point, which QEMU's firmware path does not use, and the one tiny guest both VMMs run " +
		"(the boot suite's `TinyKernel`) halts at once and dirties nothing. QEMU's migration is therefore not measured, and no number stands in for it.\n")
	return b.String()
}
