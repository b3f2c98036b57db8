package bench

import (
	"context"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"govmm/dirtylog"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// CheckpointConfig parameterises the checkpoint suite.
type CheckpointConfig struct {
	// Pages are the Dirtier working sets to try (nominal dirty pages per
	// epoch); each gets a guest big enough to hold it.
	Pages []int
	// Epoch is the fixed epoch length (default 50ms).
	Epoch time.Duration
	// Warmup epochs are dropped (the first follows the initial sync);
	// Epochs are kept per working set.
	Warmup, Epochs int
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

// StepSample is one cycle of the separate step loop: the vCPU pause, a
// standalone dirty-log harvest and the resume, timed apart outside
// replication (replicate's EpochStats times the stop, with device
// quiescing, and the harvest apart too, but not the resume alone).
type StepSample struct {
	Nominal              int
	Pause, Harvest, Resu time.Duration
	DirtyPages           int
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
	Steps    []StepSample
	Bounds   []BoundSample
	Compress []CompressSample
	Config   CheckpointConfig
}

// Checkpoint drives real replication of a tiny dirtying guest to an
// in-process standby over loopback and records every epoch's pause
// broken into steps and its time to ack, for each working set; then the
// memcpy and loopback lower bounds for the same page counts.
func Checkpoint(ctx context.Context, cfg CheckpointConfig) (*CheckpointResult, error) {
	if len(cfg.Pages) == 0 {
		cfg.Pages = []int{100, 1000, 4096, 16384, 65536}
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
	res := &CheckpointResult{Config: cfg}
	type run struct {
		pages   int
		epoch   time.Duration
		comp    StreamMode
		content string
		steps   bool // time the steps apart after it (once per working set)
	}
	var runs []run
	for _, n := range cfg.Pages {
		for i, content := range cfg.Contents {
			for j, c := range cfg.Modes {
				runs = append(runs, run{n, cfg.Epoch, c, content, i == 0 && j == 0})
			}
		}
	}
	for _, r := range runs {
		ss, steps, err := checkpointRun(ctx, cfg, r.pages, r.epoch, r.comp, r.content, r.steps)
		if err != nil {
			return res, fmt.Errorf("checkpoint %d pages, epoch %v, %s pages, compression %v: %w", r.pages, r.epoch, r.content, r.comp, err)
		}
		res.Samples = append(res.Samples, ss...)
		res.Steps = append(res.Steps, steps...)
		var dirty, pause, bpp []float64
		for _, s := range ss {
			dirty = append(dirty, float64(s.Stats.DirtyPages))
			pause = append(pause, usOf(s.Stats.Pause))
			bpp = append(bpp, bytesPerPage(s.Stats))
		}
		fmt.Fprintf(cfg.Log, "checkpoint: %6d %s pages, epoch %v, %v: %d epochs, dirty median %.0f, pause median %.0f µs, %.0f wire bytes per dirty page\n",
			r.pages, r.content, r.epoch, r.comp, len(ss), Summarize(dirty).Median, Summarize(pause).Median, Summarize(bpp).Median)
	}
	for _, content := range cfg.Contents {
		for _, m := range cfg.Modes {
			if m.Deltas {
				continue // the codec alone; deltas show in the runs
			}
			cs, err := measureCompress(m.Compression, content, maxInt(cfg.Pages))
			if err != nil {
				return res, err
			}
			res.Compress = append(res.Compress, cs)
		}
	}
	// Bounds at a fixed grid and at each run's measured median.
	grid := map[int]bool{}
	for _, n := range []int{100, 300, 1000, 3000, 10000, 30000, 65536} {
		if n <= maxInt(cfg.Pages) {
			grid[n] = true
		}
	}
	for _, g := range groupSamples(res.Samples) {
		if m := int(math.Round(g.dirty.Median)); m > 0 {
			grid[m] = true
		}
	}
	var counts []int
	for n := range grid {
		counts = append(counts, n)
	}
	sort.Ints(counts)
	b, err := measureBounds(ctx, counts, cfg.BoundReps)
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

// checkpointRun replicates one guest for warm-up plus cfg.Epochs epochs,
// then times the steps apart on the same guest.
func checkpointRun(ctx context.Context, cfg CheckpointConfig, pages int, epoch time.Duration, mode StreamMode,
	content string, withSteps bool) ([]CheckpointSample, []StepSample, error) {
	m, err := newTinyMachine(pages, memFor(pages))
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	if content == ContentBinary {
		ws, err := m.Memory().Slice(dirtyBase, uint64(pages)*guestmem.PageSize)
		if err != nil {
			return nil, nil, err
		}
		if err := fillBinary(ws); err != nil {
			return nil, nil, err
		}
	}
	if err := m.Start(); err != nil {
		return nil, nil, err
	}
	if err := waitPasses(ctx, m, 1, time.Minute); err != nil {
		return nil, nil, err
	}
	sb, err := startStandbyWith(ctx, nil, mode.Deltas)
	if err != nil {
		return nil, nil, err
	}
	defer sb.stop()
	rep, err := replicate.StartReplication(ctx, m, replicate.ReplicateConfig{To: sb.addr, Insecure: true,
		Name: "bench", Epoch: epoch, FailoverTimeout: 10 * time.Second, Compression: mode.Compression, Deltas: mode.Deltas,
		Logger: quietLogger()})
	if err != nil {
		return nil, nil, err
	}
	defer rep.Stop()
	want := uint64(cfg.Warmup + cfg.Epochs)
	// One more, so the last kept has its ack.
	if err := waitEpochs(ctx, rep, want+1, time.Duration(want)*epoch*4+2*time.Minute); err != nil {
		return nil, nil, err
	}
	time.Sleep(epoch) // acks in flight arrive
	recent := rep.Recent()
	rep.Stop() // before the step loop, which takes the machine's dirty tracker
	sb.stop()
	var out []CheckpointSample
	for _, es := range recent {
		if len(out) == cfg.Epochs {
			break
		}
		if es.Epoch <= recent[0].Epoch+uint64(cfg.Warmup)-1 {
			continue
		}
		out = append(out, CheckpointSample{Nominal: pages, Epoch: epoch, Mode: mode, Content: content, Stats: es})
	}
	if !withSteps {
		return out, nil, nil
	}

	// The steps apart: pause, harvest alone, resume, one epoch apart.
	steps, err := stepLoop(ctx, m, pages, epoch, minInt(cfg.Epochs, 20))
	return out, steps, err
}

// bytesPerPage is what one checkpoint put on the wire (pages, state,
// framing, tags) per dirty page.
func bytesPerPage(es replicate.EpochStats) float64 {
	if es.DirtyPages == 0 {
		return math.NaN()
	}
	return float64(es.Bytes) / float64(es.DirtyPages)
}

// fillBinary fills b with copies of this program's executable: x86 code
// and data, page-like contents for the codecs to work on.
func fillBinary(b []byte) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	src, err := os.ReadFile(exe)
	if err != nil {
		return err
	}
	if len(src) == 0 {
		return fmt.Errorf("executable %s is empty", exe)
	}
	for off := 0; off < len(b); off += copy(b[off:], src) {
	}
	return nil
}

// measureCompress times the sender's page codec c over the page sections
// of one epoch of pages dirtied pages holding content, on this goroutine
// (one core), as the sender builds and compresses them.
func measureCompress(c stream.Compression, content string, pages int) (CompressSample, error) {
	ws := make([]byte, pages*guestmem.PageSize)
	if content == ContentBinary {
		if err := fillBinary(ws); err != nil {
			return CompressSample{}, err
		}
	}
	for i := 0; i < len(ws); i += guestmem.PageSize {
		ws[i]++ // the Dirtier's write
	}
	enc := stream.NewPageEncoder(c)
	s := CompressSample{Compression: c, Content: content, Pages: pages}
	var sec container.PageSection
	best := time.Duration(math.MaxInt64)
	for range 3 { // best of three: the host is shared
		in, out := 0, 0
		start := time.Now()
		for i := 0; i < pages; i += container.MaxPagesPerSection {
			sec.Reset()
			for j := i; j < min(i+container.MaxPagesPerSection, pages); j++ {
				sec.Add(uint64(j*guestmem.PageSize), ws[j*guestmem.PageSize:(j+1)*guestmem.PageSize])
			}
			p := sec.Payload()
			in += len(p)
			out += len(enc.Encode(p))
		}
		if d := time.Since(start); d < best {
			best = d
		}
		s.In, s.Out = in, out
	}
	s.Time = best
	return s, nil
}

// stepLoop pauses m n times, one epoch apart, timing the pause, a
// standalone harvest and the resume separately.
func stepLoop(ctx context.Context, m *vmm.Machine, pages int, epoch time.Duration, n int) ([]StepSample, error) {
	tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: true})
	if err != nil {
		return nil, err
	}
	defer tr.Close()
	if _, err := tr.Harvest(); err != nil {
		return nil, err
	}
	var out []StepSample
	for i := 0; i < n+2; i++ {
		select {
		case <-ctx.Done():
			return out, ctx.Err()
		case <-time.After(epoch):
		}
		t0 := time.Now()
		if err := m.Pause(); err != nil {
			return out, err
		}
		t1 := time.Now()
		set, err := tr.Harvest()
		if err != nil {
			_ = m.Resume()
			return out, err
		}
		t2 := time.Now()
		if err := m.Resume(); err != nil {
			return out, err
		}
		t3 := time.Now()
		if i >= 2 {
			out = append(out, StepSample{Nominal: pages, Pause: t1.Sub(t0), Harvest: t2.Sub(t1), Resu: t3.Sub(t2), DirtyPages: set.Count()})
		}
	}
	return out, nil
}

// measureBounds times, for each page count, copying that many pages with
// copy() into a warm buffer, and sending that many bytes over a loopback
// TCP connection until a one-byte ack comes back. (Long, on purpose: the
// two bounds side by side, each a few lines of setup around its timed
// loop, read as the definition of what the report compares against.)
func measureBounds(ctx context.Context, counts []int, reps int) ([]BoundSample, error) {
	maxN := maxInt(counts)
	src := make([]byte, maxN*guestmem.PageSize)
	dst := make([]byte, maxN*guestmem.PageSize)
	for i := range src {
		src[i] = byte(i)
	}
	copy(dst, src) // both warm
	var out []BoundSample
	for _, n := range counts {
		for r := 0; r < reps; r++ {
			t0 := time.Now()
			for p := 0; p < n; p++ {
				off := p * guestmem.PageSize
				copy(dst[off:off+guestmem.PageSize], src[off:off+guestmem.PageSize])
			}
			out = append(out, BoundSample{Kind: "memcpy", Pages: n, Time: time.Since(t0)})
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return out, err
	}
	defer ln.Close()
	type conn struct {
		c   net.Conn
		err error
	}
	accepted := make(chan conn, 1)
	go func() {
		c, err := ln.Accept()
		accepted <- conn{c, err}
	}()
	var d net.Dialer
	tx, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		return out, err
	}
	defer tx.Close()
	a := <-accepted
	if a.err != nil {
		return out, a.err
	}
	rx := a.c
	defer rx.Close()
	// The receiver reads a length, then that many bytes, then acks.
	go func() {
		buf := make([]byte, 1<<20)
		hdr := make([]byte, 8)
		for {
			if _, err := io.ReadFull(rx, hdr); err != nil {
				return
			}
			left := int(leUint64(hdr))
			for left > 0 {
				k, err := rx.Read(buf[:minInt(left, len(buf))])
				if err != nil {
					return
				}
				left -= k
			}
			if _, err := rx.Write([]byte{1}); err != nil {
				return
			}
		}
	}()
	ack := make([]byte, 1)
	hdr := make([]byte, 8)
	for _, n := range counts {
		size := n * guestmem.PageSize
		for r := 0; r < reps+1; r++ {
			putLeUint64(hdr, uint64(size))
			t0 := time.Now()
			if _, err := tx.Write(hdr); err != nil {
				return out, err
			}
			if _, err := tx.Write(src[:size]); err != nil {
				return out, err
			}
			if _, err := io.ReadFull(tx, ack); err != nil {
				return out, err
			}
			if r > 0 { // the first warms the socket buffers
				out = append(out, BoundSample{Kind: "loopback", Pages: n, Time: time.Since(t0)})
			}
		}
	}
	return out, nil
}

// sampleGroup is the epochs of one (working set, epoch length) run.
type sampleGroup struct {
	nominal                                        int
	epoch                                          time.Duration
	n                                              int
	dirty, pause, stop, harvest, copy, state, rest Summary
	ack, length, bpp                               Summary
	comp                                           StreamMode
	content                                        string
}

func groupSamples(samples []CheckpointSample) []sampleGroup {
	type key struct {
		n       int
		e       time.Duration
		comp    StreamMode
		content string
	}
	var keys []key
	by := map[key][]CheckpointSample{}
	for _, s := range samples {
		k := key{s.Nominal, s.Epoch, s.Mode, s.Content}
		if _, ok := by[k]; !ok {
			keys = append(keys, k)
		}
		by[k] = append(by[k], s)
	}
	var out []sampleGroup
	for _, k := range keys {
		var dirty, pause, stop, harvest, cp, state, rest, ack, length, bpp []float64
		for _, s := range by[k] {
			es := s.Stats
			dirty = append(dirty, float64(es.DirtyPages))
			pause = append(pause, usOf(es.Pause))
			stop = append(stop, usOf(es.Stop))
			harvest = append(harvest, usOf(es.Harvest))
			cp = append(cp, usOf(es.Copy))
			state = append(state, usOf(es.State))
			rest = append(rest, usOf(restOf(es)))
			if es.AckTime > 0 {
				ack = append(ack, usOf(es.AckTime))
			}
			length = append(length, msOf(es.Length))
			if es.DirtyPages > 0 {
				bpp = append(bpp, bytesPerPage(es))
			}
		}
		out = append(out, sampleGroup{nominal: k.n, epoch: k.e, n: len(by[k]), dirty: Summarize(dirty), pause: Summarize(pause),
			stop: Summarize(stop), harvest: Summarize(harvest), copy: Summarize(cp), state: Summarize(state), rest: Summarize(rest),
			ack: Summarize(ack), length: Summarize(length), bpp: Summarize(bpp), comp: k.comp, content: k.content})
	}
	return out
}

// restOf is what the pause spent outside the steps EpochStats times:
// resuming the vCPUs.
func restOf(es replicate.EpochStats) time.Duration {
	return es.Pause - es.Stop - es.Harvest - es.Copy - es.State
}

// boundAt is the median time of kind for n pages, interpolated
// log-linearly between measured counts.
func boundAt(bounds []BoundSample, kind string, n float64) float64 {
	by := map[int][]float64{}
	for _, b := range bounds {
		if b.Kind == kind {
			by[b.Pages] = append(by[b.Pages], usOf(b.Time))
		}
	}
	var counts []int
	for c := range by {
		counts = append(counts, c)
	}
	sort.Ints(counts)
	if len(counts) == 0 || n <= 0 {
		return math.NaN()
	}
	med := func(c int) float64 { return Summarize(by[c]).Median }
	if n <= float64(counts[0]) {
		return med(counts[0]) * n / float64(counts[0])
	}
	for i := 1; i < len(counts); i++ {
		lo, hi := float64(counts[i-1]), float64(counts[i])
		if n <= hi {
			f := (n - lo) / (hi - lo)
			return med(counts[i-1]) + f*(med(counts[i])-med(counts[i-1]))
		}
	}
	last := counts[len(counts)-1]
	return med(last) * n / float64(last)
}

func (r *CheckpointResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		es := s.Stats
		rows = append(rows, []string{strconv.Itoa(s.Nominal), ftoa(msOf(s.Epoch), 1), strconv.FormatUint(es.Epoch, 10),
			strconv.Itoa(es.DirtyPages), ftoa(usOf(es.Pause), 1), ftoa(usOf(es.Stop), 1), ftoa(usOf(es.Harvest), 1),
			ftoa(usOf(es.Copy), 1), ftoa(usOf(es.State), 1), ftoa(usOf(restOf(es)), 1), ftoa(usOf(es.AckTime), 1),
			ftoa(msOf(es.Length), 3), strconv.FormatUint(es.Bytes, 10), s.Mode.String(), s.Content,
			ftoa(bytesPerPage(es), 1)})
	}
	if err := writeCSV(filepath.Join(dir, "checkpoint.csv"), []string{"nominal_pages", "epoch_ms", "epoch", "dirty_pages",
		"pause_us", "stop_us", "harvest_us", "copy_us", "state_us", "rest_us", "ack_us", "length_ms", "bytes",
		"stream", "content", "bytes_per_dirty_page"}, rows); err != nil {
		return err
	}
	rows = nil
	for _, c := range r.Compress {
		rows = append(rows, []string{c.Compression.String(), c.Content, strconv.Itoa(c.Pages), strconv.Itoa(c.In), strconv.Itoa(c.Out),
			ftoa(usOf(c.Time), 1)})
	}
	if err := writeCSV(filepath.Join(dir, "checkpoint_compress.csv"), []string{"compression", "content", "pages", "section_bytes",
		"wire_bytes", "time_us"}, rows); err != nil {
		return err
	}
	rows = nil
	for _, s := range r.Steps {
		rows = append(rows, []string{strconv.Itoa(s.Nominal), strconv.Itoa(s.DirtyPages), ftoa(usOf(s.Pause), 1),
			ftoa(usOf(s.Harvest), 1), ftoa(usOf(s.Resu), 1)})
	}
	if err := writeCSV(filepath.Join(dir, "checkpoint_steps.csv"), []string{"nominal_pages", "dirty_pages", "vcpu_pause_us",
		"harvest_only_us", "vcpu_resume_us"}, rows); err != nil {
		return err
	}
	rows = nil
	for _, b := range r.Bounds {
		rows = append(rows, []string{b.Kind, strconv.Itoa(b.Pages), ftoa(usOf(b.Time), 1)})
	}
	if err := writeCSV(filepath.Join(dir, "checkpoint_bounds.csv"), []string{"kind", "pages", "time_us"}, rows); err != nil {
		return err
	}
	return r.plot(dir)
}

// firstSamples are the samples of the first compression and content run
// (the plots show those; the report's tables show them all).
func (r *CheckpointResult) firstSamples() []CheckpointSample {
	if len(r.Samples) == 0 {
		return nil
	}
	c, k := r.Samples[0].Mode, r.Samples[0].Content
	var out []CheckpointSample
	for _, s := range r.Samples {
		if s.Mode == c && s.Content == k {
			out = append(out, s)
		}
	}
	return out
}

func (r *CheckpointResult) plot(dir string) error {
	first := r.firstSamples()
	groups := groupSamples(first)
	var pauseX, pauseY, ackX, ackY, medX, medY, medAX, medAY []float64
	for _, s := range first {
		if s.Stats.DirtyPages <= 0 {
			continue
		}
		pauseX = append(pauseX, float64(s.Stats.DirtyPages))
		pauseY = append(pauseY, usOf(s.Stats.Pause))
		if s.Stats.AckTime > 0 {
			ackX = append(ackX, float64(s.Stats.DirtyPages))
			ackY = append(ackY, usOf(s.Stats.AckTime))
		}
	}
	for _, g := range groups {
		medX, medY = append(medX, g.dirty.Median), append(medY, g.pause.Median)
		medAX, medAY = append(medAX, g.dirty.Median), append(medAY, g.ack.Median)
	}
	boundSeries := func(kind, name string) Series {
		by := map[int][]float64{}
		for _, b := range r.Bounds {
			if b.Kind == kind {
				by[b.Pages] = append(by[b.Pages], usOf(b.Time))
			}
		}
		s := Series{Name: name, Line: true, Dashed: true}
		for n, ts := range by {
			s.X, s.Y = append(s.X, float64(n)), append(s.Y, Summarize(ts).Median)
		}
		return s
	}
	err := lineChart(filepath.Join(dir, "checkpoint_pause.png"), "Checkpoint pause and ack vs dirty pages per epoch",
		"dirty pages per epoch (measured)", "time (µs)", LogLog, []Series{
			{Name: "pause (each epoch)", X: pauseX, Y: pauseY},
			{Name: "pause (median per run)", X: medX, Y: medY, Line: true},
			{Name: "time to ack (each epoch)", X: ackX, Y: ackY},
			{Name: "time to ack (median per run)", X: medAX, Y: medAY, Line: true},
			boundSeries("memcpy", "memcpy bound (copy() N pages)"),
			boundSeries("loopback", "loopback bound (N×4 KiB over TCP + ack)"),
		})
	if err != nil {
		return err
	}
	// The steps side by side on log axes, one line each against the
	// run's dirty pages per epoch: stacked bars on a linear axis flattened
	// the small working sets, where the fixed costs (stop, state, resume)
	// are the whole pause, into the axis.
	steps := []Series{
		{Name: "whole pause", Line: true, Dashed: true},
		{Name: "stop vCPUs + quiesce", Line: true},
		{Name: "harvest", Line: true},
		{Name: "copy to staging", Line: true},
		{Name: "save state", Line: true},
		{Name: "resume (rest)", Line: true},
	}
	for _, g := range groups {
		for i, v := range []float64{g.pause.Median, g.stop.Median, g.harvest.Median, g.copy.Median, g.state.Median, g.rest.Median} {
			steps[i].X, steps[i].Y = append(steps[i].X, g.dirty.Median), append(steps[i].Y, v)
		}
	}
	if len(groups) == 0 {
		return fmt.Errorf("checkpoint: no epochs to plot")
	}
	return lineChart(filepath.Join(dir, "checkpoint_breakdown.png"), fmt.Sprintf("Pause broken into steps (medians per run, epoch %v)", groups[0].epoch),
		"dirty pages per epoch (measured median of the run)", "time (µs)", LogLog, steps)
}

// Report renders the checkpoint section of report.md.
func (r *CheckpointResult) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nGuest: one vCPU running `tinyguest.Dirtier` over the working set (guest RAM sized to hold it: 64 MiB up to 512 MiB), "+
		"replicated with `replicate.StartReplication` to an in-process standby over loopback TCP, %d warm-up epochs dropped, then %d epochs kept per run. "+
		"Raw data: `checkpoint.csv` (one row per epoch), `checkpoint_steps.csv`, `checkpoint_bounds.csv`; plots `checkpoint_pause.png`, `checkpoint_breakdown.png` (each step's median against the dirty pages, log–log).\n\n",
		platform(), r.Config.Warmup, r.Config.Epochs)
	b.WriteString("Step names are replicate's `EpochStats`: *stop* is pausing the vCPUs and quiescing the devices; *harvest* takes the dirty set alone (KVM's log and the VMM's own bitmap) with the guest already stopped; " +
		"*copy* is copying the dirty pages into the staging buffer (one buffer, reused from epoch to epoch); *state* is SaveState + marshal, the epoch's disk writes and sealing its output; *rest* = pause − the four, i.e. resuming the vCPUs. " +
		"*Ack* runs from the resume to the standby's ack (streaming the staging buffer, applying it, acking).\n\n")
	b.WriteString("Each working set runs once per page content (*sparse*: the Dirtier's one byte per page over zeroes; *binary*: the same writes over pages holding a copy of this program's executable, x86 code and data) " +
		"and per stream mode (`--stream-compress`, `+deltas` for `--stream-deltas`), side by side in this run. *Wire B/page* is the checkpoint's bytes on the wire (pages, state, frame headers, AES-GCM tags) per dirty page, *× none* that against the same content uncompressed. " +
		"The plots show the first compression and content only.\n\n")
	b.WriteString("| working set | content | stream | epoch | epochs | dirty pages/epoch median (p25–p75) | wire B/page median | × none | pause median µs (p25–p75) | stop µs | harvest µs | copy µs | state µs | rest µs | ack median µs (p25–p75) | actual epoch length ms | memcpy bound µs | loopback bound µs | pause / memcpy |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	groups := groupSamples(r.Samples)
	rawBPP := map[string]float64{}
	for _, g := range groups {
		if g.comp == (StreamMode{Compression: stream.CompressNone}) {
			rawBPP[fmt.Sprint(g.nominal, g.content)] = g.bpp.Median
		}
	}
	for _, g := range groups {
		mc := boundAt(r.Bounds, "memcpy", g.dirty.Median)
		lb := boundAt(r.Bounds, "loopback", g.dirty.Median)
		fmt.Fprintf(&b, "| %d | %s | %v | %v | %d | %.0f (%.0f–%.0f) | %.0f | %.3f | %.0f (%.0f–%.0f) | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f (%.0f–%.0f) | %.1f | %.0f | %.0f | %.1f× |\n",
			g.nominal, g.content, g.comp, g.epoch, g.n, g.dirty.Median, g.dirty.P25, g.dirty.P75, g.bpp.Median, g.bpp.Median/rawBPP[fmt.Sprint(g.nominal, g.content)],
			g.pause.Median, g.pause.P25, g.pause.P75,
			g.stop.Median, g.harvest.Median, g.copy.Median, g.state.Median, g.rest.Median, g.ack.Median, g.ack.P25, g.ack.P75, g.length.Median, mc, lb, g.pause.Median/mc)
	}
	if len(r.Compress) > 0 {
		b.WriteString("\nThe sender's page codec alone (`checkpoint_compress.csv`): one epoch of the largest working set, its page sections built and compressed on one core as the sender does (best of three), " +
			"beside the stream's sealing (AES-256-GCM), which follows it on the same goroutine.\n\n")
		b.WriteString("| content | compression | pages | section MB | wire MB | ratio | MB/s per core (of section bytes) | ms per epoch |\n|---|---|---|---|---|---|---|---|\n")
		for _, c := range r.Compress {
			fmt.Fprintf(&b, "| %s | %v | %d | %.1f | %.1f | %.3f | %.0f | %.1f |\n", c.Content, c.Compression, c.Pages, float64(c.In)/1e6, float64(c.Out)/1e6,
				float64(c.Out)/float64(c.In), float64(c.In)/c.Time.Seconds()/1e6, msOf(c.Time))
		}
	}
	if len(r.Steps) > 0 {
		b.WriteString("\nThe same guests after replication stopped, one epoch apart, with the steps timed apart (`checkpoint_steps.csv`): " +
			"vCPU pause alone, a dirty-log harvest alone (KVM GET/CLEAR_DIRTY_LOG + the VMM's own bitmap), vCPU resume alone.\n\n")
		b.WriteString("| working set | cycles | dirty pages median | vCPU pause µs median (p25–p75) | harvest alone µs median (p25–p75) | vCPU resume µs median (p25–p75) |\n|---|---|---|---|---|---|\n")
		by := map[int][]StepSample{}
		var order []int
		for _, s := range r.Steps {
			if _, ok := by[s.Nominal]; !ok {
				order = append(order, s.Nominal)
			}
			by[s.Nominal] = append(by[s.Nominal], s)
		}
		for _, n := range order {
			var d, p, h, rs []float64
			for _, s := range by[n] {
				d, p, h, rs = append(d, float64(s.DirtyPages)), append(p, usOf(s.Pause)), append(h, usOf(s.Harvest)), append(rs, usOf(s.Resu))
			}
			sp, sh, sr := Summarize(p), Summarize(h), Summarize(rs)
			fmt.Fprintf(&b, "| %d | %d | %.0f | %.0f (%.0f–%.0f) | %.0f (%.0f–%.0f) | %.0f (%.0f–%.0f) |\n", n, len(by[n]), Summarize(d).Median,
				sp.Median, sp.P25, sp.P75, sh.Median, sh.P25, sh.P75, sr.Median, sr.P25, sr.P75)
		}
	}
	b.WriteString("\nBounds (`checkpoint_bounds.csv`, median of repeated runs): *memcpy* copies N pages one at a time with `copy()` into a warm buffer; " +
		"*loopback* writes N×4096 bytes on a loopback TCP connection and waits for a one-byte ack. Bound columns above are interpolated at the run's measured median dirty count.\n\n")
	b.WriteString("| pages | memcpy µs | loopback µs |\n|---|---|---|\n")
	byN := map[int]bool{}
	var ns []int
	for _, x := range r.Bounds {
		if !byN[x.Pages] {
			byN[x.Pages] = true
			ns = append(ns, x.Pages)
		}
	}
	sort.Ints(ns)
	for _, n := range ns {
		fmt.Fprintf(&b, "| %d | %.1f | %.1f |\n", n, boundMedian(r.Bounds, "memcpy", n), boundMedian(r.Bounds, "loopback", n))
	}
	return b.String()
}

func boundMedian(bounds []BoundSample, kind string, n int) float64 {
	var xs []float64
	for _, b := range bounds {
		if b.Kind == kind && b.Pages == n {
			xs = append(xs, usOf(b.Time))
		}
	}
	return Summarize(xs).Median
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

func minInt(a, b int) int {
	if a < b {
		return a
	}
	return b
}
