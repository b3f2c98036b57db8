package bench

import (
	"fmt"
	"image/color"
	"math"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot/plotutil"

	"govmm/replicate/stream"
	"govmm/vmm/guestmem"
)

// ackPoint is the samples of one mode and page count, by kind, and the
// per-round ratios of stream to bound (wall and CPU), to the tuned bound,
// to the sealed bound (keyed points) and to the held and applied bounds
// (unkeyed).
type ackPointSamples struct {
	mode                                        string // modeOf its samples
	pages                                       int
	gap                                         time.Duration
	stream, bound, tuned, sealed, held, applied []AckSample
	wall, cpu                                   []float64 // per round: stream / bound
	wallTuned                                   []float64 // per round: stream / tuned bound
	wallSealed                                  []float64 // per round: stream / sealed bound
	wallHeld                                    []float64 // per round: stream / held bound
	wallApplied                                 []float64 // per round: stream / applied bound
}

// points groups the samples per mode and page count, in run order.
func (r *AckResult) points() []*ackPointSamples {
	var out []*ackPointSamples
	find := func(mode string, pages int, gap time.Duration) *ackPointSamples {
		for _, p := range out {
			if p.mode == mode && p.pages == pages && p.gap == gap {
				return p
			}
		}
		p := &ackPointSamples{mode: mode, pages: pages, gap: gap}
		out = append(out, p)
		return p
	}
	for _, s := range r.Samples {
		p := find(modeOf(s), s.Pages, s.Gap)
		switch s.Kind {
		case "stream":
			p.stream = append(p.stream, s)
			continue
		case "sealed":
			p.sealed = append(p.sealed, s)
			p.wallSealed = p.vsStream(p.wallSealed, len(p.sealed)-1, s, false)
			continue
		case "tuned":
			p.tuned = append(p.tuned, s)
			p.wallTuned = p.vsStream(p.wallTuned, len(p.tuned)-1, s, false)
			continue
		case "held":
			p.held = append(p.held, s)
			p.wallHeld = p.vsStream(p.wallHeld, len(p.held)-1, s, false)
			continue
		case "applied":
			p.applied = append(p.applied, s)
			p.wallApplied = p.vsStream(p.wallApplied, len(p.applied)-1, s, false)
			continue
		}
		p.bound = append(p.bound, s)
		p.wall = p.vsStream(p.wall, len(p.bound)-1, s, false)
		p.cpu = p.vsStream(p.cpu, len(p.bound)-1, s, true)
	}
	// The modes take turns within each round (ackPoints), so their
	// points first appear interleaved: a mode's rows together, in the
	// order the modes first ran.
	rank := map[string]int{}
	for _, p := range out {
		if _, ok := rank[p.mode]; !ok {
			rank[p.mode] = len(rank)
		}
	}
	slices.SortStableFunc(out, func(a, b *ackPointSamples) int { return rank[a.mode] - rank[b.mode] })
	return out
}

// vsStream appends to ratios the point's stream sample of round k over
// s, a reference's sample of that round (its wall or CPU time), if the
// stream has one.
func (p *ackPointSamples) vsStream(ratios []float64, k int, s AckSample, cpu bool) []float64 {
	if k >= len(p.stream) {
		return ratios
	}
	if cpu {
		return append(ratios, float64(p.stream[k].CPU)/float64(s.CPU))
	}
	return append(ratios, float64(p.stream[k].Wall)/float64(s.Wall))
}

// of is the point's samples of kind.
func (p *ackPointSamples) of(kind string) []AckSample {
	switch kind {
	case "bound":
		return p.bound
	case "tuned":
		return p.tuned
	case "sealed":
		return p.sealed
	case "held":
		return p.held
	case "applied":
		return p.applied
	}
	return p.stream
}

// modeOf is a sample's mode: "unkeyed", or "keyed" and its cipher,
// then the stream's send buffer policy where it is not the default.
func modeOf(s AckSample) string {
	m := "unkeyed"
	if s.Keyed {
		m = "keyed " + s.Cipher
	}
	if s.SendBuffer != "" {
		m += ", send buffer " + s.SendBuffer
	}
	return m
}

// keyed says whether the point's stream is keyed.
func (p *ackPointSamples) keyed() bool { return strings.HasPrefix(p.mode, "keyed ") }

// modes are the results' modes, in run order.
func (r *AckResult) modes() []string {
	var out []string
	for _, s := range r.Samples {
		if m := modeOf(s); !slices.Contains(out, m) {
			out = append(out, m)
		}
	}
	return out
}

// ciphers names the keyed modes' ciphers, for the report.
func (r *AckResult) ciphers() string {
	var out []string
	for _, s := range r.Samples {
		if s.Keyed && !slices.Contains(out, s.Cipher) {
			out = append(out, s.Cipher)
		}
	}
	if len(out) == 0 {
		return "none run"
	}
	return strings.Join(out, " and ")
}

// ackMs summarizes the wall or CPU milliseconds per ack of samples.
func ackMs(samples []AckSample, cpu bool) Summary {
	var xs []float64
	for _, s := range samples {
		if cpu {
			xs = append(xs, msOf(s.CPU))
		} else {
			xs = append(xs, msOf(s.Wall))
		}
	}
	return Summarize(xs)
}

// Report is the suite's section of report.md.
func (r *AckResult) Report() string {
	var b strings.Builder
	where, cpuNote := "in this process", "both ends: on this host they share the cores, so an ack cannot come sooner than its CPU divided by the cores"
	if r.Config.Split {
		where = "in two processes (`--split`): the Receiver and the bound's reader in a process of their own pinned to one CPU, " +
			"the Sender and the bound's writer in this one pinned to another, as a primary and a standby on two one-core hosts"
		cpuNote = "both processes; *standby CPU* is the standby end's share: each end has one core, so an ack cannot come " +
			"sooner than the busier end's CPU"
	}
	fmt.Fprintf(&b, "Stream alone (`replicate/stream`, as `BenchmarkAck`): a Sender and a Receiver %s over loopback TCP, "+
		"each checkpoint %s distinct non-zero pages and 64 KiB of state, uncompressed, into a `StagingSink` over guest memory (guestmem, as a standby's), "+
		"the pages staged as a primary's pause stages them (%s), "+
		"each waiting for its ack before the next; keyed (each cipher a mode of its own: %s) and unkeyed (in clear, checked by the End frame's sum). "+
		"Beside each batch, the *loopback bound*: the same number of bytes (the checkpoint's wire bytes) written on a plain "+
		"loopback TCP connection until a one-byte ack comes back. %d rounds per point, each a batch of the stream then one of "+
		"the bound (each batch at least %v and three acks), the modes taking turns within each round at each page count, so "+
		"that modes too are compared side by side in time, each checkpoint (and each bound transfer) followed by a *gap* "+
		"(%s): back to back, a checkpoint meets the last one's leftovers (the standby copies a checkpoint into memory after "+
		"its ack); a gap stands for the epoch a replicated guest runs between two checkpoints; only the checkpoints are "+
		"timed, while the CPU per ack counts the gaps too. *ratio* is the median of the rounds' stream/bound ratios, so "+
		"neighbours in time are compared. *CPU* is the user and system time per ack (%s). The *tuned bound*, a batch after "+
		"the bound's, is the bound with its writer's send buffer fixed at %d KiB (SO_SNDBUF) instead of the kernel's "+
		"autotuned one, which the bound uses: it is often faster, so the bound is not a floor (docs/STREAM.md, "+
		"\"The bound is not a floor\"); the stream by default fixes its own the same way on a link as short as this one "+
		"(`stream.Config.SendBuffer`; a mode named \"send buffer kernel\" leaves it to the kernel, for comparison: "+
		"docs/STREAM.md, \"A short link's send buffer\"); *to tuned* is the median of the rounds' stream/tuned-bound ratios. Keyed points also have a "+
		"*sealed bound*, a batch after the tuned bound's: the same bytes sealed with the stream's cipher in 1 MiB chunks under the "+
		"point's key, written and opened one chunk at a time, then the ack (what those bytes cost once each is sealed and "+
		"opened, without the stream's framing, sums or pipelining); *to sealed* is the median of the rounds' "+
		"stream/sealed-bound ratios. Unkeyed points have a *held bound* instead, a batch after the tuned bound's: the "+
		"bound's bytes, which the reader keeps, all of them, in one buffer the checkpoint's size (reused from transfer to "+
		"transfer) until the ack, instead of reading each megabyte over the last in a buffer that stays in cache: a standby "+
		"may ack a checkpoint only once it holds all of it, so it must at least do that (docs/STREAM.md, \"What holding a "+
		"checkpoint costs\"); *to held* is the median of the rounds' stream/held-bound ratios. And an *applied bound*, a batch "+
		"after the held bound's: the held bound, its reader then copying what it held into guest memory (page by page, "+
		"non-temporal stores, as a standby applies a checkpoint) on a goroutine of its own after the ack, while it reads "+
		"the next transfer into a second buffer, and acking a transfer only once the last one's copy is done: the least a "+
		"standby does per checkpoint; *to applied* is the median of the rounds' stream/applied-bound ratios. Keyed points' "+
		"applied bound is the sealed one applied: the sealed bound's chunks, each opened straight into the held buffer, "+
		"then copied into memory the same way. The End frame's sum ran its %s loop in this process (`stream.SumLoop`). Raw data `ack.csv` (one row per "+
		"batch); plots `ack_time.png` (ms per ack) and `ack_cpu.png` (CPU ms per ack), log–log, and `ack_ratio.png` "+
		"(the ratios against the goal of 1.3×: unkeyed over the bound, the tuned, held and applied bounds, keyed over the bound, the sealed and the sealed applied bound).\n\n",
		where, joinInts(r.Config.Pages), ackStaging(), r.ciphers(), r.Config.Rounds, r.Config.Batch, joinDurations(r.Config.Gaps), cpuNote, tunedSendBuffer>>10, stream.SumLoop())
	head, rule := "", ""
	if r.Config.Split {
		head, rule = " stream standby CPU ms/ack | bound standby CPU ms/ack | applied bound standby CPU ms/ack |", "---|---|---|"
	}
	b.WriteString("| mode | dirty pages | gap | wire B/page | stream ms/ack median (p25–p75) | bound ms/ack median (p25–p75) | ratio median (p25–p75) | stream CPU ms/ack | bound CPU ms/ack | CPU ratio median | tuned bound ms/ack median (p25–p75) | to tuned median (p25–p75) | sealed bound ms/ack median (p25–p75) | to sealed median (p25–p75) | held bound ms/ack median (p25–p75) | to held median (p25–p75) | applied bound ms/ack median (p25–p75) | to applied median (p25–p75) |" + head + "\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + rule + "\n")
	for _, p := range r.points() {
		sw, bw, sc, bc := ackMs(p.stream, false), ackMs(p.bound, false), ackMs(p.stream, true), ackMs(p.bound, true)
		wr, cr := Summarize(p.wall), Summarize(p.cpu)
		wire := 0.0
		if len(p.stream) > 0 {
			wire = float64(p.stream[0].Wire) / float64(p.pages)
		}
		fmt.Fprintf(&b, "| %s | %d | %v | %.0f | %.2f (%.2f–%.2f) | %.2f (%.2f–%.2f) | %.2f× (%.2f–%.2f) | %.2f | %.2f | %.2f× |",
			p.mode, p.pages, p.gap, wire, sw.Median, sw.P25, sw.P75, bw.Median, bw.P25, bw.P75,
			wr.Median, wr.P25, wr.P75, sc.Median, bc.Median, cr.Median)
		for _, ref := range []struct {
			samples []AckSample
			ratios  []float64
		}{{p.tuned, p.wallTuned}, {p.sealed, p.wallSealed}, {p.held, p.wallHeld}, {p.applied, p.wallApplied}} {
			if len(ref.samples) == 0 {
				b.WriteString(" – | – |")
				continue
			}
			d, w := ackMs(ref.samples, false), Summarize(ref.ratios)
			fmt.Fprintf(&b, " %.2f (%.2f–%.2f) | %.2f× (%.2f–%.2f) |", d.Median, d.P25, d.P75, w.Median, w.P25, w.P75)
		}
		if r.Config.Split {
			fmt.Fprintf(&b, " %.2f | %.2f |", standbyMs(p.stream).Median, standbyMs(p.bound).Median)
			if len(p.applied) == 0 {
				b.WriteString(" – |")
			} else {
				fmt.Fprintf(&b, " %.2f |", standbyMs(p.applied).Median)
			}
		}
		b.WriteString("\n")
	}
	if len(r.SendBuffers) > 0 {
		b.WriteString("\n**Send buffers.** What each mode's stream ended its handshake with (`stream.Sender.SendBuffer`, `RTT`, at its first page count):\n\n")
		for _, m := range r.modes() {
			if sb, ok := r.SendBuffers[m]; ok {
				fmt.Fprintf(&b, "- %s: %s\n", m, sb)
			}
		}
	}
	b.WriteString(r.cipherReport())
	b.WriteString(r.eachReport())
	return b.String()
}

// cipherReport is the report's table of the keyed stream's two cipher
// passes per ack, beside its time to ack and the plain bound's.
func (r *AckResult) cipherReport() string {
	var b strings.Builder
	for _, p := range r.points() {
		if !p.keyed() || len(p.stream) == 0 {
			continue
		}
		if b.Len() == 0 {
			b.WriteString("\n**The cipher's passes.** Per ack of each keyed stream's batches, medians over the rounds: the Sender's time " +
				"sealing frames (`stream.Stats.SealTime`, on the primary's end) and the Receiver's opening them (`OpenTime`, on the " +
				"standby's), wall time inside the cipher's calls (its reads of the pages and writes of the ciphertext included); " +
				"beside them the stream's time to ack, the plain bound's, and what the stream took beyond the bound. " +
				"Each pass adds to its own end's work (split, each end's one core), on top of the copies into and out of the " +
				"connection that the bound's writer and reader make too. Raw data: `ack.csv`'s `seal_ms_per_ack` and `open_ms_per_ack`.\n\n")
			b.WriteString("| mode | dirty pages | gap | stream ms/ack | bound ms/ack | stream − bound ms | seal ms/ack | open ms/ack |\n")
			b.WriteString("|---|---|---|---|---|---|---|---|\n")
		}
		sw, bw := ackMs(p.stream, false), ackMs(p.bound, false)
		var seal, open []float64
		for _, s := range p.stream {
			seal, open = append(seal, msOf(s.Seal)), append(open, msOf(s.Open))
		}
		fmt.Fprintf(&b, "| %s | %d | %v | %.2f | %.2f | %.2f | %.2f | %.2f |\n", p.mode, p.pages, p.gap,
			sw.Median, bw.Median, sw.Median-bw.Median, Summarize(seal).Median, Summarize(open).Median)
	}
	return b.String()
}

// eachReport is the report's table over every ack (eachRatio).
func (r *AckResult) eachReport() string {
	var b strings.Builder
	b.WriteString("\n**Each ack.** The table above takes each batch's mean, and after a gap a batch holds only a few acks " +
		"(four at 50 ms), so one stall of the host (on this project's host, itself a VM, one end's CPU taken away for " +
		"tens of ms now and then, in the stream's batches and the bounds' alike) decides that batch's mean, and whether " +
		"it lands in the stream's batch or the bound's swings the round's ratio (docs/STREAM.md, \"One ack at a time\"). " +
		"This table pools every ack of a point over all its rounds: *median* and *p90* of the time to ack, and each " +
		"*ratio* the stream's median over the reference's (in parentheses, p25–p75 of the rounds' ratios of their own " +
		"medians); *p90 ratio* is the stream's p90 over the bound's, the tails side by side. Raw data `ack_each.csv` " +
		"(one row per ack); plot `ack_ratio_each.png`.\n\n")
	b.WriteString("| mode | dirty pages | gap | stream acks | stream ms median (p90) | bound ms median (p90) | ratio (rounds p25–p75) | p90 ratio | to tuned | to sealed | to held | to applied |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.points() {
		s, bd := Summarize(eachMs(p.stream)), Summarize(eachMs(p.bound))
		fmt.Fprintf(&b, "| %s | %d | %v | %d | %.2f (%.2f) | %.2f (%.2f) |", p.mode, p.pages, p.gap, s.N,
			s.Median, s.P90, bd.Median, bd.P90)
		for i, ref := range [][]AckSample{p.bound, p.tuned, p.sealed, p.held, p.applied} {
			pooled, rounds := p.eachRatio(ref)
			if len(rounds) == 0 {
				b.WriteString(" – |")
			} else {
				m := Summarize(rounds)
				fmt.Fprintf(&b, " %.2f× (%.2f–%.2f) |", pooled, m.P25, m.P75)
			}
			if i == 0 {
				fmt.Fprintf(&b, " %.2f× |", s.P90/bd.P90)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// standbyMs summarizes the standby end's CPU milliseconds per ack.
func standbyMs(samples []AckSample) Summary {
	var xs []float64
	for _, s := range samples {
		xs = append(xs, msOf(s.StandbyCPU))
	}
	return Summarize(xs)
}

func joinDurations(ds []time.Duration) string {
	var s []string
	for _, d := range ds {
		s = append(s, d.String())
	}
	return strings.Join(s, ", ")
}

func joinInts(xs []int) string {
	var s []string
	for _, x := range xs {
		s = append(s, strconv.Itoa(x))
	}
	return strings.Join(s, ", ")
}

// write saves ack.csv and the plots into dir.
func (r *AckResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{modeOf(s), strconv.Itoa(s.Pages), s.Kind, ftoa(msOf(s.Gap), 0), strconv.Itoa(s.Round), strconv.Itoa(s.Acks),
			ftoa(msOf(s.Wall), 4), ftoa(msOf(s.CPU), 4), strconv.Itoa(s.Wire), ftoa(msOf(s.StandbyCPU), 4),
			ftoa(msOf(s.Seal), 4), ftoa(msOf(s.Open), 4)})
	}
	if err := writeCSV(filepath.Join(dir, "ack.csv"), []string{"mode", "pages", "kind", "gap_ms", "round", "acks", "wall_ms_per_ack",
		"cpu_ms_per_ack", "wire_bytes", "standby_cpu_ms_per_ack", "seal_ms_per_ack", "open_ms_per_ack"}, rows); err != nil {
		return err
	}
	rows = rows[:0]
	for _, s := range r.Samples {
		for i, d := range s.Each {
			rows = append(rows, []string{modeOf(s), strconv.Itoa(s.Pages), s.Kind, ftoa(msOf(s.Gap), 0), strconv.Itoa(s.Round),
				strconv.Itoa(i), ftoa(msOf(d), 4)})
		}
	}
	if err := writeCSV(filepath.Join(dir, "ack_each.csv"), []string{"mode", "pages", "kind", "gap_ms", "round", "ack", "wall_ms"}, rows); err != nil {
		return err
	}
	for _, cpu := range []bool{false, true} {
		var series []Series
		for _, mode := range r.modes() {
			for _, gap := range r.Config.Gaps {
				for _, kind := range ackKinds(mode != "unkeyed") {
					s := Series{Name: fmt.Sprintf("%s (%s, gap %v)", kind, mode, gap), Line: true, Dashed: kind != "stream"}
					for _, p := range r.points() {
						if p.mode != mode || p.gap != gap {
							continue
						}
						m := ackMs(p.of(kind), cpu)
						s.X, s.Y = append(s.X, float64(p.pages)), append(s.Y, m.Median)
						s.Lo, s.Hi = append(s.Lo, m.P25), append(s.Hi, m.P75)
					}
					series = append(series, s)
				}
			}
		}
		name, title, ylabel := "ack_time.png", "Time to ack: stream vs loopback bound", "ms per ack (median, p25–p75)"
		if cpu {
			name, title, ylabel = "ack_cpu.png", "CPU per ack (both ends): stream vs loopback bound", "CPU ms per ack (median, p25–p75)"
		}
		if err := lineChart(filepath.Join(dir, name), title, "dirty pages per checkpoint", ylabel, LogLog, series); err != nil {
			return err
		}
	}
	if err := r.ratioChart(filepath.Join(dir, "ack_ratio.png"), "stream ÷ bound (median of rounds, p25–p75)", batchRatio); err != nil {
		return err
	}
	return r.ratioChart(filepath.Join(dir, "ack_ratio_each.png"), "stream ÷ bound, each ack (median of all; bars: rounds p25–p75)", eachRatioPoint)
}

// ackGoal is issue 13's goal for time to ack, as a multiple of the
// bound: drawn on the ratio chart.
const ackGoal = 1.3

// ackRefs are the references the goal is about, as the ratio
// charts draw them: unkeyed time to ack over the bound, the tuned bound,
// the held and the applied bound, keyed (each cipher) over the bound,
// the sealed bound and the sealed applied bound; with the point's samples of each and the rounds'
// ratios of batch means. A keyed reference's name follows its mode's.
var ackRefs = []struct {
	keyed  bool
	name   string
	of     func(p *ackPointSamples) []AckSample
	ratios func(p *ackPointSamples) []float64
}{
	{false, "unkeyed ÷ bound", func(p *ackPointSamples) []AckSample { return p.bound }, func(p *ackPointSamples) []float64 { return p.wall }},
	{false, "unkeyed ÷ tuned bound", func(p *ackPointSamples) []AckSample { return p.tuned }, func(p *ackPointSamples) []float64 { return p.wallTuned }},
	{false, "unkeyed ÷ held bound", func(p *ackPointSamples) []AckSample { return p.held }, func(p *ackPointSamples) []float64 { return p.wallHeld }},
	{false, "unkeyed ÷ applied bound", func(p *ackPointSamples) []AckSample { return p.applied }, func(p *ackPointSamples) []float64 { return p.wallApplied }},
	{true, "÷ bound", func(p *ackPointSamples) []AckSample { return p.bound }, func(p *ackPointSamples) []float64 { return p.wall }},
	{true, "÷ sealed bound", func(p *ackPointSamples) []AckSample { return p.sealed }, func(p *ackPointSamples) []float64 { return p.wallSealed }},
	{true, "÷ sealed applied bound", func(p *ackPointSamples) []AckSample { return p.applied }, func(p *ackPointSamples) []float64 { return p.wallApplied }},
}

// ratioChart draws the ratios the goal is about (ackRefs) per
// mode and gap, and the goal as a line. Each point is ratio's (the value
// and its bar's ends) for the point and a reference's samples; ok false
// leaves it out.
func (r *AckResult) ratioChart(path, ylabel string, ratio func(p *ackPointSamples, ref []AckSample, rounds []float64) (y, lo, hi float64, ok bool)) error {
	var series []Series
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, gap := range r.Config.Gaps {
		i := 0
		for _, c := range ackRefs {
			for _, mode := range r.modes() {
				if (mode != "unkeyed") != c.keyed {
					continue
				}
				name := c.name
				if c.keyed {
					name = mode + " " + c.name // one per cipher
				}
				// One color per ratio, whatever the gap (dashed after a gap).
				s := Series{Name: fmt.Sprintf("%s (gap %v)", name, gap), Line: true, Dashed: gap > 0, Color: plotutil.Color(i)}
				i++
				for _, p := range r.points() {
					if p.mode != mode || p.gap != gap {
						continue
					}
					y, l, h, ok := ratio(p, c.of(p), c.ratios(p))
					if !ok {
						continue
					}
					s.X, s.Y = append(s.X, float64(p.pages)), append(s.Y, y)
					s.Lo, s.Hi = append(s.Lo, l), append(s.Hi, h)
					lo, hi = math.Min(lo, float64(p.pages)), math.Max(hi, float64(p.pages))
				}
				series = append(series, s)
			}
		}
	}
	if lo <= hi {
		series = append(series, Series{Name: fmt.Sprintf("goal: %.1f×", ackGoal), X: []float64{lo, hi}, Y: []float64{ackGoal, ackGoal},
			Line: true, Dashed: true, Color: color.Black})
	}
	return lineChart(path, "Time to ack over its bound (issue 13's goal: 1.3×)", "dirty pages per checkpoint",
		ylabel, Axes{LogX: true}, series)
}

// batchRatio is a ratio chart's point from the rounds' ratios of batch
// means: their median, p25-p75.
func batchRatio(_ *ackPointSamples, _ []AckSample, rounds []float64) (y, lo, hi float64, ok bool) {
	if len(rounds) == 0 {
		return 0, 0, 0, false
	}
	m := Summarize(rounds)
	return m.Median, m.P25, m.P75, true
}

// eachRatioPoint is a ratio chart's point from every ack: the stream's
// median over ref's, with the rounds' ratios of their own medians
// p25-p75.
func eachRatioPoint(p *ackPointSamples, ref []AckSample, _ []float64) (y, lo, hi float64, ok bool) {
	pooled, rounds := p.eachRatio(ref)
	if len(rounds) == 0 || math.IsNaN(pooled) {
		return 0, 0, 0, false
	}
	m := Summarize(rounds)
	return pooled, m.P25, m.P75, true
}

// eachMs is every ack's wall milliseconds in samples, pooled.
func eachMs(samples []AckSample) []float64 {
	var xs []float64
	for _, s := range samples {
		for _, d := range s.Each {
			xs = append(xs, msOf(d))
		}
	}
	return xs
}

// eachRatio is the point's stream median time to ack over every ack of
// every round, divided by ref's (a bound's, over each transfer), and
// each round's ratio of its own two medians (the stream's batch over
// ref's batch in the same round: neighbours in time).
func (p *ackPointSamples) eachRatio(ref []AckSample) (pooled float64, rounds []float64) {
	pooled = Summarize(eachMs(p.stream)).Median / Summarize(eachMs(ref)).Median
	for k := range min(len(p.stream), len(ref)) {
		s, r := Summarize(eachMs(p.stream[k:k+1])).Median, Summarize(eachMs(ref[k:k+1])).Median
		if !math.IsNaN(s) && !math.IsNaN(r) {
			rounds = append(rounds, s/r)
		}
	}
	return pooled, rounds
}

// ackStaging says how this process staged the suite's pages (stagePages).
func ackStaging() string {
	if guestmem.PageSumFast() {
		return "each page copied and summed at once, `guestmem.CopyPageSummed`, so that the unkeyed stream takes its zero test " +
			"and End sum from those sums instead of reading the page again: `SendSummedPage`"
	}
	return "copied: this CPU has no vector loop to sum them as they are copied, so the stream reads each page to test and sum it"
}
