package bench

import (
	"context"
	"fmt"
	"io"
	"math"
	"sort"
	"time"

	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// The checkpoint suite, by file: this one holds its configuration, its
// results and the order of the runs; checkpoint_run.go replicates a
// dirtying guest and collects each epoch; checkpoint_harvest.go times the
// dirty-log harvest alone, bitmap against ring; checkpoint_bounds.go
// measures the memcpy and loopback lower bounds; checkpoint_compress.go
// times the page codecs alone; checkpoint_write.go writes the CSVs and
// plots; checkpoint_report.go renders the report's tables.

// CheckpointConfig parameterises the checkpoint suite.
type CheckpointConfig struct {
	// Pages are the Dirtier working sets to try (nominal dirty pages per
	// epoch); each gets a guest big enough to hold it.
	Pages []int
	// HarvestPages are the exact dirty sets the harvest runs time, for
	// each of Trackings (default: Pages, and 65000 beside 65536, the
	// largest round set a 64k-entry ring holds with KVM's reserve).
	HarvestPages []int
	// Trackings are the dirty tracking modes the harvest runs compare
	// (default vmm.DirtyBitmap and vmm.DirtyRing).
	Trackings []string
	// Copies are the checkpoint copy modes each working set runs with
	// (default CopyStop, CopyCoW and CopyAuto).
	Copies []string
	// Epoch is the epoch length (default 50ms), lengthened for a working
	// set the Dirtier cannot write whole in it (twice its pass time): the
	// samples and the report say which ran.
	Epoch time.Duration
	// Warmup epochs are dropped (the first follows the initial sync);
	// Epochs are kept per working set. HarvestCycles are the harvests
	// kept per tracking mode and dirty set (default 20).
	Warmup, Epochs, HarvestCycles int
	// BoundReps is how many times each bound is measured (median kept).
	BoundReps int
	// Modes are the stream settings to run each working set with, side
	// by side (default none, s2, zstd and s2 with deltas).
	Modes []StreamMode
	// Contents are what the working set's pages hold (default both):
	// ContentSparse, ContentBinary.
	Contents []string
	Out      string
	Log      io.Writer
}

// What the Dirtier's working set holds: it writes one byte per page,
// over zeroes (sparse: each page compresses to almost nothing) or over a
// copy of this program's executable (binary: pages of x86 code and data,
// as much of a real guest's memory holds).
const (
	ContentSparse = "sparse"
	ContentBinary = "binary"
)

// Checkpoint copy modes: stop-and-copy (the guest stays paused while the
// dirty pages are copied), copy-on-write (it resumes first) and auto
// (each checkpoint one or the other by its dirty set), as replicate
// names them.
const (
	CopyStop = string(replicate.CopyStop)
	CopyCoW  = string(replicate.CopyCoW)
	CopyAuto = string(replicate.CopyAuto)
)

// StreamMode is how the stream ships pages: --stream-compress and
// --stream-deltas.
type StreamMode struct {
	Compression stream.Compression
	Deltas      bool
}

// String names the mode as the report shows it: the codec, and
// "+deltas" with deltas.
func (m StreamMode) String() string {
	if m.Deltas {
		return m.Compression.String() + "+deltas"
	}
	return m.Compression.String()
}

// CheckpointSample is one epoch of real replication.
type CheckpointSample struct {
	Nominal int           // the Dirtier's working set
	Epoch   time.Duration // configured epoch length
	Copy    string        // CopyStop or CopyCoW
	Mode    StreamMode
	Content string
	Stats   replicate.EpochStats
}

// CompressSample is one codec compressing a 64k-page epoch's page
// sections on one core, as the sender does.
type CompressSample struct {
	Compression stream.Compression
	Content     string
	Pages       int
	In, Out     int // page section bytes in, Pages frame payload bytes out
	Time        time.Duration
}

// BoundSample is one measurement of a lower bound for moving n pages.
type BoundSample struct {
	Kind  string // "memcpy" or "loopback"
	Pages int
	Time  time.Duration
}

// CheckpointResult is everything the suite measured.
type CheckpointResult struct {
	Samples  []CheckpointSample
	Harvests []HarvestSample
	Bounds   []BoundSample
	Compress []CompressSample
	Config   CheckpointConfig
}

// Checkpoint drives real replication of a tiny dirtying guest to an
// in-process standby over loopback and records every epoch's pause
// broken into steps and its time to ack, for each working set, copy mode,
// page content and stream mode; then times the dirty-log harvest alone
// with each tracking mode, the page codecs alone, and the memcpy and
// loopback lower bounds, all in the same run.
func Checkpoint(ctx context.Context, cfg CheckpointConfig) (*CheckpointResult, error) {
	cfg.defaults()
	res := &CheckpointResult{Config: cfg}
	if err := res.replicateAll(ctx); err != nil {
		return res, err
	}
	if err := res.harvestAll(ctx); err != nil {
		return res, err
	}
	if err := res.compressAll(); err != nil {
		return res, err
	}
	b, err := measureBounds(ctx, res.boundCounts(), cfg.BoundReps)
	if err != nil {
		return res, err
	}
	res.Bounds = b
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

// defaults fills in what the caller left zero.
func (cfg *CheckpointConfig) defaults() {
	if len(cfg.Pages) == 0 {
		cfg.Pages = []int{100, 1000, 4096, 16384, 65536}
	}
	if len(cfg.HarvestPages) == 0 {
		cfg.HarvestPages = append([]int(nil), cfg.Pages...)
		if maxInt(cfg.Pages) >= 65536 {
			cfg.HarvestPages = append(cfg.HarvestPages, 65000)
			sort.Ints(cfg.HarvestPages)
		}
	}
	if len(cfg.Trackings) == 0 {
		cfg.Trackings = []string{vmm.DirtyBitmap, vmm.DirtyRing}
	}
	if len(cfg.Copies) == 0 {
		cfg.Copies = checkpointCopies()
	}
	if cfg.Epoch <= 0 {
		cfg.Epoch = 50 * time.Millisecond
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 5
	}
	if cfg.Epochs <= 0 {
		cfg.Epochs = 40
	}
	if cfg.HarvestCycles <= 0 {
		cfg.HarvestCycles = 20
	}
	if cfg.BoundReps <= 0 {
		cfg.BoundReps = 7
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if len(cfg.Modes) == 0 {
		cfg.Modes = []StreamMode{{stream.CompressNone, false}, {stream.CompressS2, false}, {stream.CompressZstd, false},
			{stream.CompressS2, true}}
	}
	if len(cfg.Contents) == 0 {
		cfg.Contents = []string{ContentSparse, ContentBinary}
	}
}

// replicateAll replicates each working set once per copy mode, content and
// stream mode, and logs each run's medians.
func (res *CheckpointResult) replicateAll(ctx context.Context) error {
	cfg := res.Config
	for _, n := range cfg.Pages {
		epoch, fitted := cfg.Epoch, false // the first run fits it to the working set, the others keep it
		for _, cp := range cfg.Copies {
			for _, content := range cfg.Contents {
				for _, mode := range cfg.Modes {
					r := replicationRun{pages: n, epoch: epoch, copy: cp, mode: mode, content: content, fit: !fitted}
					ss, err := checkpointRun(ctx, cfg, r)
					if err != nil {
						return fmt.Errorf("checkpoint %s: %w", r, err)
					}
					res.Samples = append(res.Samples, ss...)
					if len(ss) > 0 {
						r.epoch, epoch, fitted = ss[0].Epoch, ss[0].Epoch, true
					}
					logRun(cfg.Log, r, ss)
				}
			}
		}
	}
	return nil
}

// logRun prints one run's medians as progress.
func logRun(w io.Writer, r replicationRun, ss []CheckpointSample) {
	var dirty, pause, bpp []float64
	for _, s := range ss {
		dirty = append(dirty, float64(s.Stats.DirtyPages))
		pause = append(pause, usOf(s.Stats.Pause))
		bpp = append(bpp, bytesPerPage(s.Stats))
	}
	fmt.Fprintf(w, "checkpoint: %s: %d epochs, dirty median %.0f, pause median %.0f µs, %.0f wire bytes per dirty page\n",
		r, len(ss), Summarize(dirty).Median, Summarize(pause).Median, Summarize(bpp).Median)
}

// compressAll times each codec alone on the largest working set, per
// content (deltas show in the replication runs).
func (res *CheckpointResult) compressAll() error {
	for _, content := range res.Config.Contents {
		for _, m := range res.Config.Modes {
			if m.Deltas {
				continue
			}
			cs, err := measureCompress(m.Compression, content, maxInt(res.Config.Pages))
			if err != nil {
				return err
			}
			res.Compress = append(res.Compress, cs)
		}
	}
	return nil
}

// boundCounts are the page counts to measure the bounds at: a fixed grid
// up to the largest working set, each replication run's median dirty
// count, and each harvest size.
func (res *CheckpointResult) boundCounts() []int {
	top := max(maxInt(res.Config.Pages), maxInt(res.Config.HarvestPages))
	grid := map[int]bool{}
	for _, n := range []int{100, 300, 1000, 3000, 10000, 30000, 65536} {
		if n <= top {
			grid[n] = true
		}
	}
	for _, g := range groupSamples(res.Samples) {
		if m := int(math.Round(g.dirty.Median)); m > 0 {
			grid[m] = true
		}
	}
	for _, n := range res.Config.HarvestPages {
		grid[n] = true
	}
	var counts []int
	for n := range grid {
		counts = append(counts, n)
	}
	sort.Ints(counts)
	return counts
}

func maxInt(xs []int) int {
	m := 0
	for _, x := range xs {
		if x > m {
			m = x
		}
	}
	return m
}
