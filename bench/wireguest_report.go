package bench

import (
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// WireGuestGoal is issue 13's goal for real-guest workloads: at most this
// many times the raw bytes per dirty page.
const WireGuestGoal = 0.3

// wireCell is one workload × mode of the report: its samples' counters
// summed (trials pooled: a ratio of sums, not a mean of ratios).
type wireCell struct {
	VMM      string // "govmm" or "baseline"
	Workload string
	Mode     StreamMode
	Agreed   []StreamMode // each trial's agreed mode, if any differs from Mode
	Trials   int
	Work     int
	Span     float64 // seconds, summed
	C        WireCounters
}

// vmms are the binaries the samples came from: govmm, and the baseline
// when there was one.
func (r *WireGuestResult) vmms() []string {
	if r.Config.Baseline != "" {
		return []string{"govmm", "baseline"}
	}
	return []string{"govmm"}
}

// sampleVMM is the binary a sample came from (results from before the
// baseline have none: govmm's).
func sampleVMM(s WireGuestSample) string {
	if s.VMM == "" {
		return "govmm"
	}
	return s.VMM
}

// label names a cell in the tables and the plot: its mode, and which
// binary when it is the baseline's.
func (c wireCell) label() string {
	if c.VMM == "baseline" {
		return c.Mode.String() + " (baseline)"
	}
	return c.Mode.String()
}

// cells pools the samples by workload, mode and binary, in the
// configured order (govmm's cell before the baseline's).
func (r *WireGuestResult) cells() []wireCell {
	var out []wireCell
	for _, w := range r.Config.Workloads {
		for _, m := range r.Config.Modes {
			for _, v := range r.vmms() {
				if c := r.cell(w, m, v); c.Trials > 0 {
					out = append(out, c)
				}
			}
		}
	}
	return out
}

// cell pools the samples of workload w in mode m from binary v.
func (r *WireGuestResult) cell(w string, m StreamMode, v string) wireCell {
	c := wireCell{VMM: v, Workload: w, Mode: m}
	for _, s := range r.Samples {
		if s.Workload != w || s.Mode != m || sampleVMM(s) != v {
			continue
		}
		c.Trials++
		c.Work += s.Work
		c.Span += s.Span.Seconds()
		c.C = c.C.Add(s.Counters)
		if s.Agreed != m {
			c.Agreed = append(c.Agreed, s.Agreed)
		}
	}
	return c
}

func (r *WireGuestResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		c := s.Counters
		rows = append(rows, []string{sampleVMM(s), s.Workload, s.Mode.String(), s.Agreed.String(), strconv.Itoa(s.Trial), ftoa(s.Span.Seconds(), 3),
			strconv.Itoa(s.Work), ftoa(c.Epochs, 0), ftoa(c.DirtyPages, 0), ftoa(c.SentPages, 0), ftoa(c.ZeroPages, 0), ftoa(c.DeltaPages, 0), ftoa(c.CopyPages, 0),
			ftoa(c.PageBytes, 0), ftoa(c.PageWireBytes, 0), ftoa(c.CheckpointBytes, 0),
			ftoa(c.BytesPerDirtyPage(), 1), ftoa(c.TimesRaw(), 4), ftoa(c.PageRatio(), 4), ftoa(c.PagesTimesRaw(), 4),
			ftoa(c.DiskBytes, 0), ftoa(c.DiskWireBytes, 0)})
	}
	if err := writeCSV(filepath.Join(dir, "wire_guest.csv"), []string{"vmm", "workload", "stream", "agreed", "trial", "window_s", "work",
		"checkpoints", "dirty_pages", "sent_pages", "zero_pages", "delta_pages", "copy_pages", "page_bytes", "page_wire_bytes", "checkpoint_bytes",
		"wire_bytes_per_dirty_page", "x_raw", "page_wire_over_page_bytes", "pages_x_raw", "disk_bytes", "disk_wire_bytes"}, rows); err != nil {
		return err
	}
	if len(r.Samples) == 0 {
		return nil
	}
	return r.plot(filepath.Join(dir, "wire_guest.png"))
}

// plot draws wire bytes per dirty page as bars, one group per workload
// and one bar per mode, with the raw size and the goal as lines; the
// value axis is logarithmic where the bars span a decade.
func (r *WireGuestResult) plot(path string) error {
	cells := r.cells()
	var vals [][]float64
	for _, c := range cells {
		vals = append(vals, []float64{c.C.BytesPerDirtyPage()})
	}
	vals = append(vals, []float64{RawPageBytes})
	logY := spansDecade(vals)
	p := plot.New()
	p.Title.Text = "Default guest replicated: checkpoint bytes on the wire per dirty page"
	p.Y.Label.Text = "wire bytes per dirty page"
	p.Add(plotter.NewGrid())
	if logY {
		p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, logTicks{}
		p.Y.Label.Text += ", log scale"
	}
	type series struct {
		vmm  string
		mode StreamMode
	}
	var all []series
	for _, m := range r.Config.Modes {
		for _, v := range r.vmms() {
			all = append(all, series{v, m})
		}
	}
	lo := math.Inf(1)
	for _, c := range cells {
		if v := c.C.BytesPerDirtyPage(); v > 0 {
			lo = min(lo, v)
		}
	}
	lo = min(lo, WireGuestGoal*RawPageBytes)
	// Bars are drawn as rectangles from the axis' bottom (gonum's bar
	// charts start at zero, which a log axis cannot show).
	bottom := 0.0
	if logY {
		bottom = lo / 1.5
	}
	width := 0.8 / float64(len(all))
	for i, se := range all {
		var bar *plotter.Polygon
		label := ""
		for j, w := range r.Config.Workloads {
			for _, c := range cells {
				v := c.C.BytesPerDirtyPage()
				if c.Workload != w || c.Mode != se.mode || c.VMM != se.vmm || !(v > 0) {
					continue
				}
				label = c.label()
				x := float64(j) + (float64(i)-float64(len(all)-1)/2)*width
				poly, err := plotter.NewPolygon(plotter.XYs{{X: x - width/2, Y: bottom}, {X: x + width/2, Y: bottom},
					{X: x + width/2, Y: v}, {X: x - width/2, Y: v}})
				if err != nil {
					return err
				}
				poly.Color = plotutil.Color(i)
				poly.LineStyle.Width = 0
				p.Add(poly)
				bar = poly
			}
		}
		if bar != nil {
			p.Legend.Add(label, bar)
		}
	}
	n := float64(len(r.Config.Workloads))
	for i, l := range []struct {
		name string
		y    float64
	}{{fmt.Sprintf("raw (%d B)", RawPageBytes), RawPageBytes}, {fmt.Sprintf("goal %.1f× raw", WireGuestGoal), WireGuestGoal * RawPageBytes}} {
		line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: l.y}, {X: n - 0.5, Y: l.y}})
		if err != nil {
			return err
		}
		line.Dashes = []vg.Length{vg.Points(4 + 2*float64(i)), vg.Points(3)}
		p.Add(line)
		p.Legend.Add(l.name, line)
	}
	p.Legend.Top = true
	p.NominalX(r.Config.Workloads...)
	p.X.Min, p.X.Max = -0.5, n-0.5
	if logY {
		p.Y.Min, p.Y.Max = bottom, RawPageBytes*4
	} else {
		p.Y.Min, p.Y.Max = 0, RawPageBytes*1.5
	}
	return savePlot(p, 8*vg.Inch, 5*vg.Inch, path)
}

// Report renders the wire-guest section of report.md.
func (r *WireGuestResult) Report() string {
	var b strings.Builder
	c := r.Config
	fmt.Fprintf(&b, "%s\n\nGuest: the default guest (256 MiB, one vCPU, a 64 MiB disk) with `--net user`, replicated by `govmm run --replicate-to` "+
		"to a `govmm standby` over loopback at the default epoch (`--failover-timeout %v`), booted anew for each stream mode (`--stream-compress`, "+
		"`+deltas` for `--stream-deltas` on both ends) in each of %d trial(s). In each guest the workloads run one after the other; each runs %v before "+
		"the primary's counters (`--metrics-listen`) are read, and %v between the two reads.\n\n", platform(), c.Timeout, c.Trials, c.Warmup, c.Window)
	b.WriteString("Workloads: *demo* is the demo service under load, " + strconv.Itoa(c.Clients) + " keep-alive connections driving POST /incr back to back " +
		"(as overhead-guest); *untar* unpacks, over and over into tmpfs, a tarball of the guest's root file system (busybox, the guest's programs, " +
		"kernel modules, libraries) and of its kernel's symbol table (`/proc/kallsyms`, text)")
	if r.TarBytes > 0 {
		fmt.Fprintf(&b, ", %.1f MiB", float64(r.TarBytes)/(1<<20))
	}
	b.WriteString("; *compress* stands in for a build, which the guest cannot run (it has no compiler): `sort` of the symbol table " +
		"(a heap of lines, as a compiler's) and `gzip` of the tarball (CPU), both written to tmpfs, over and over; " +
		"*disk* unpacks the tarball onto the guest's disk (ext4 on virtio-blk) and syncs, over and over, so that most of its checkpoints' " +
		"bytes are disk writes (its own table, below). " +
		"Raw data `wire_guest.csv` (one row per workload and boot), plot `wire_guest.png`.\n\n")
	fmt.Fprintf(&b, "*Wire B/dirty page* is the checkpoints' bytes on the wire (pages, state, frame headers, tags: `govmm_replication_bytes_total`) "+
		"over the dirty pages they shipped (`govmm_replication_dirty_pages_total`), as `ctl stats` derives it; *× raw* is that over %d B, a page and "+
		"its entry uncompressed (issue 13's goal: ≤ %.1f×); *pages × raw* is the Pages frames' bytes on the wire per page sent over %d B "+
		"(`govmm_stream_sent_page_wire_bytes_total` / (`_pages_total` × %d)), from the stream's counters alone; *page wire / section* is what "+
		"the codec leaves of the page sections' bytes (`_page_wire_bytes_total` / `_page_bytes_total`; a section holds a delta as its XOR page "+
		"and a copy as 12 bytes); *zero* the share of the pages sent that were all zero (a flag on the wire), "+
		"*deltas* the share of the others sent as XOR deltas, *copies* as a reference to a page with the same bytes that the standby holds "+
		"(stream version 8, with deltas). "+
		"The checkpoint counters grow when a checkpoint ends, the stream's as its pages are sent: with few checkpoints in a window (each one long) "+
		"the two families cut the window differently, and *× raw* and *pages × raw* can disagree.\n\n", RawPageBytes, WireGuestGoal, RawPageBytes, RawPageBytes)
	b.WriteString("| workload | stream | checkpoints | dirty pages/s | dirty pages/checkpoint | zero | deltas | copies | page MiB raw | page MiB on the wire | checkpoint MiB | wire B/dirty page | × raw | pages × raw | page wire / section | passes or answers |\n" +
		"|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, cell := range r.cells() {
		k := cell.C
		mode := cell.label()
		if len(cell.Agreed) > 0 {
			mode += fmt.Sprintf(" (agreed: %v)", cell.Agreed)
		}
		fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f | %.1f | %s | %s | %s | %.1f | %.1f | %.1f | %.0f | %.3f× | %.3f× | %.3f× | %d |\n",
			cell.Workload, mode, k.Epochs, ratio(k.DirtyPages, cell.Span), ratio(k.DirtyPages, k.Epochs), pct(k.ZeroShare()), pct(k.DeltaShare()), pct(k.CopyShare()),
			k.PageBytes/(1<<20), k.PageWireBytes/(1<<20), k.CheckpointBytes/(1<<20), k.BytesPerDirtyPage(), k.TimesRaw(), k.PagesTimesRaw(), k.PageRatio(), cell.Work)
	}
	b.WriteString(r.verdict())
	b.WriteString(r.baselineTable())
	b.WriteString(r.diskTable())
	if len(r.Failed) > 0 {
		fmt.Fprintf(&b, "\n%d boot(s) failed; their finished workloads are in the table, their logs are `wire_guest-failed-*`:\n\n", len(r.Failed))
		for _, f := range r.Failed {
			fmt.Fprintf(&b, "- %s\n", f)
		}
	}
	return b.String()
}

// diskTable is the report's table of disk writes, for the workloads and
// modes whose windows carried any: the disk bytes the Disk frames wrote
// or zeroed, the frames' bytes on the wire, and their ratio (what the
// session's codec leaves of them, since stream version 12).
func (r *WireGuestResult) diskTable() string {
	var b strings.Builder
	for _, cell := range r.cells() {
		k := cell.C
		if k.DiskBytes <= 0 {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\nDisk writes (`govmm_stream_sent_disk_bytes_total`, and `_disk_wire_bytes_total` as the Disk frames travelled, " +
				"compressed with the session's codec or stored; the workloads' × raw above counts them in the checkpoints' bytes):\n\n" +
				"| workload | stream | disk MiB written | disk MiB on the wire | disk wire / written | disk share of checkpoint bytes | passes or answers |\n" +
				"|---|---|---|---|---|---|---|\n")
		}
		fmt.Fprintf(&b, "| %s | %s | %.1f | %.1f | %.3f× | %s | %d |\n", cell.Workload, cell.label(), k.DiskBytes/(1<<20), k.DiskWireBytes/(1<<20),
			k.DiskRatio(), pct(ratio(k.DiskWireBytes, k.CheckpointBytes)), cell.Work)
	}
	return b.String()
}

// pct writes a share as a percentage ("-" when it has no divisor).
func pct(v float64) string {
	if math.IsNaN(v) {
		return "-"
	}
	return strconv.FormatFloat(100*v, 'f', 1, 64) + "%"
}

// verdict is a line per workload: its smallest × raw, in which mode, and
// whether that meets the goal.
func (r *WireGuestResult) verdict() string {
	var b strings.Builder
	for _, w := range r.Config.Workloads {
		best, bestMode := math.Inf(1), ""
		for _, c := range r.cells() {
			if x := c.C.TimesRaw(); c.VMM == "govmm" && c.Workload == w && !math.IsNaN(x) && x < best {
				best, bestMode = x, c.Mode.String()
			}
		}
		if bestMode == "" {
			continue
		}
		meets := "meets"
		if best > WireGuestGoal {
			meets = "misses"
		}
		if b.Len() == 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "- *%s*: fewest bytes with %s, %.3f× raw: %s the goal of %.1f×.\n", w, bestMode, best, meets, WireGuestGoal)
	}
	return b.String()
}

// baselineTable compares govmm with the baseline binary, workload by
// workload and mode by mode, where both have samples: wire bytes per
// dirty page, what the codec leaves of the page sections, and the bytes
// per checkpoint besides pages and disk writes (state, framing), each as
// govmm's over the baseline's, beside the dirty pages per second each
// guest's workload made (the workloads are the same, their pace is not:
// a ratio of bytes per page is fair where the paces are alike).
func (r *WireGuestResult) baselineTable() string {
	if r.Config.Baseline == "" {
		return ""
	}
	var b strings.Builder
	for _, w := range r.Config.Workloads {
		for _, m := range r.Config.Modes {
			g, bl := r.cell(w, m, "govmm"), r.cell(w, m, "baseline")
			if g.Trials == 0 || bl.Trials == 0 {
				continue
			}
			if b.Len() == 0 {
				fmt.Fprintf(&b, "\nThis govmm against the baseline binary (*baseline*, `%s`), replicated the same way in the same trials, "+
					"each ratio govmm's over the baseline's; *other B/checkpoint* is what a checkpoint's bytes on the wire hold besides its "+
					"Pages and Disk frames (the machine state, frame headers, the End frame, tags), per checkpoint:\n\n"+
					"| workload | stream | wire B/dirty page | baseline | ratio | page wire / section | baseline | ratio | "+
					"other B/checkpoint | baseline | ratio | dirty pages/s | baseline |\n"+
					"|---|---|---|---|---|---|---|---|---|---|---|---|---|\n", r.Config.Baseline)
			}
			gk, bk := g.C, bl.C
			fmt.Fprintf(&b, "| %s | %s | %.0f | %.0f | %.2f× | %.3f× | %.3f× | %.2f× | %.0f | %.0f | %.2f× | %.0f | %.0f |\n", w, m,
				gk.BytesPerDirtyPage(), bk.BytesPerDirtyPage(), ratio(gk.BytesPerDirtyPage(), bk.BytesPerDirtyPage()),
				gk.PageRatio(), bk.PageRatio(), ratio(gk.PageRatio(), bk.PageRatio()),
				gk.OtherPerCheckpoint(), bk.OtherPerCheckpoint(), ratio(gk.OtherPerCheckpoint(), bk.OtherPerCheckpoint()),
				ratio(gk.DirtyPages, g.Span), ratio(bk.DirtyPages, bl.Span))
		}
	}
	return b.String()
}
