package bench

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"govmm/replicate"
	"govmm/replicate/stream"
)

// sampleGroup is the epochs of one replication run.
type sampleGroup struct {
	nominal                                        int
	epoch                                          time.Duration
	n                                              int
	dirty, pause, stop, harvest, copy, state, rest Summary
	ack, length, bpp, background, preHarvest       Summary
	pauseAck                                       Summary // per epoch, pause + ack: what held output waits beyond the epoch
	copyMode, copyUsed                             string
	copyMix                                        string // epochs per copy mode used, e.g. "stop 4, cow 6"
	comp                                           StreamMode
	content                                        string
}

// groupKey identifies one replication run among the samples.
type groupKey struct {
	n       int
	e       time.Duration
	copy    string
	comp    StreamMode
	content string
}

// groupSamples groups the samples by run, in the order the runs came.
func groupSamples(samples []CheckpointSample) []sampleGroup {
	var keys []groupKey
	by := map[groupKey][]CheckpointSample{}
	for _, s := range samples {
		k := groupKey{s.Nominal, s.Epoch, s.Copy, s.Mode, s.Content}
		if _, ok := by[k]; !ok {
			keys = append(keys, k)
		}
		by[k] = append(by[k], s)
	}
	var out []sampleGroup
	for _, k := range keys {
		out = append(out, summarizeGroup(k, by[k]))
	}
	return out
}

// summarizeGroup is the order statistics of one run's epochs.
func summarizeGroup(k groupKey, ss []CheckpointSample) sampleGroup {
	var dirty, pause, stop, harvest, pre, cp, state, rest, ack, length, bpp, bg, pa []float64
	used := map[string]bool{}
	count := map[string]int{}
	for _, s := range ss {
		es := s.Stats
		used[es.CopyMode] = true
		count[es.CopyMode]++
		bg = append(bg, usOf(es.Background))
		dirty = append(dirty, float64(es.DirtyPages))
		pause = append(pause, usOf(es.Pause))
		stop = append(stop, usOf(es.Stop))
		harvest = append(harvest, usOf(es.Harvest))
		pre = append(pre, usOf(es.PreHarvest))
		cp = append(cp, usOf(es.Copy))
		state = append(state, usOf(es.State))
		rest = append(rest, usOf(restOf(es)))
		if es.AckTime > 0 {
			ack = append(ack, usOf(es.AckTime))
			pa = append(pa, usOf(es.Pause+es.AckTime))
		}
		length = append(length, msOf(es.Length))
		if es.DirtyPages > 0 {
			bpp = append(bpp, bytesPerPage(es))
		}
	}
	return sampleGroup{nominal: k.n, epoch: k.e, n: len(ss), dirty: Summarize(dirty), pause: Summarize(pause),
		stop: Summarize(stop), harvest: Summarize(harvest), copy: Summarize(cp), state: Summarize(state), rest: Summarize(rest),
		ack: Summarize(ack), length: Summarize(length), bpp: Summarize(bpp), background: Summarize(bg), preHarvest: Summarize(pre),
		pauseAck: Summarize(pa), copyMode: k.copy, copyUsed: strings.Join(sortedKeys(used), "+"), copyMix: copyMix(count),
		comp: k.comp, content: k.content}
}

// copyMix says how many epochs used each copy mode, stop first.
func copyMix(count map[string]int) string {
	var parts []string
	for _, m := range []string{CopyStop, CopyCoW} {
		if count[m] > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", m, count[m]))
		}
	}
	return strings.Join(parts, ", ")
}

// sortedKeys is the keys of m in order.
func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// restOf is what the pause spent outside the steps EpochStats times:
// resuming the vCPUs.
func restOf(es replicate.EpochStats) time.Duration {
	return es.Pause - es.Stop - es.Harvest - es.Copy - es.State
}

// Report renders the checkpoint section of report.md.
func (r *CheckpointResult) Report() string {
	var b strings.Builder
	r.reportIntro(&b)
	r.reportRuns(&b)
	r.reportCopies(&b)
	r.reportCompress(&b)
	r.reportHarvest(&b)
	r.reportBounds(&b)
	return b.String()
}

func (r *CheckpointResult) reportIntro(b *strings.Builder) {
	fmt.Fprintf(b, "%s\n\nGuest: one vCPU running `tinyguest.Dirtier` over the working set (guest RAM sized to hold it: 64 MiB up to 512 MiB), "+
		"replicated with `replicate.StartReplication` to an in-process standby over loopback TCP, %d warm-up epochs dropped, then %d epochs kept per run. "+
		"The epoch is %v, or, for a working set the Dirtier cannot write whole in it, twice its pass time (measured before the first run of that working set, unreplicated; the *epoch* column): each epoch then dirties the whole working set, whatever the copy and stream modes. "+
		"Raw data: `checkpoint.csv` (one row per epoch), `checkpoint_harvest.csv`, `checkpoint_bounds.csv`, `checkpoint_compress.csv`; plots `checkpoint_pause.png` (pause and ack against dirty pages, per copy mode), "+
		"`checkpoint_breakdown.png` (each step's median against the dirty pages), `checkpoint_stream.png` (wire bytes per dirty page and time to ack per stream mode), `checkpoint_harvest.png` (harvest alone, per tracking mode); all log–log.\n\n",
		platform(), r.Config.Warmup, r.Config.Epochs, r.Config.Epoch)
	b.WriteString("Step names are replicate's `EpochStats`: *stop* is pausing the vCPUs and quiescing the devices; *harvest* takes the dirty set alone (KVM's log and the VMM's own bitmap) with the guest already stopped, only the pages written since the *pre-harvest*, which takes the rest just before the pause with the guest running (not part of the pause); " +
		"*copy* is copying the dirty pages into the staging buffer (one buffer, reused from epoch to epoch), or with copy-on-write write-protecting them, whose copy then runs after the resume (*background copy*: from the resume until every page is copied); *state* is what the state save adds after the copy (the vCPUs read their registers on their own threads while the harvest and copy run; then the chips, the clock, the devices, the encoding), the epoch's disk writes and sealing its output; *rest* = pause − the four, i.e. resuming the vCPUs. " +
		"*Ack* runs from the resume to the standby's ack (streaming the staging buffer, applying it, acking).\n\n")
	fmt.Fprintf(b, "Each working set runs once per copy mode (*stop*: stop-and-copy; *cow*: copy-on-write; this run: %s), per page content (*sparse*: the Dirtier's one byte per page over zeroes; *binary*: the same writes over pages holding a copy of this program's executable, x86 code and data) "+
		"and per stream mode (`--stream-compress`, `+deltas` for `--stream-deltas`), side by side in this run. *Wire B/page* is the checkpoint's bytes on the wire (pages, state, frame headers and trailers: the bench's stream is unkeyed, so CRC32C, not AES-GCM tags) per dirty page, *× none* that against the same content uncompressed.\n\n",
		strings.Join(r.Config.Copies, ", "))
}

func (r *CheckpointResult) reportRuns(b *strings.Builder) {
	b.WriteString("| working set | copy (used) | content | stream | epoch | epochs | dirty pages/epoch median (p25–p75) | wire B/page median | × none | pause median µs (p25–p75) | stop µs | harvest µs | pre-harvest µs (guest running) | copy µs | state µs | rest µs | background copy µs median | ack median µs (p25–p75) | actual epoch length ms | memcpy bound µs | loopback bound µs | pause / memcpy | ack / loopback |\n")
	b.WriteString("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	groups := groupSamples(r.Samples)
	rawBPP := map[string]float64{}
	for _, g := range groups {
		if g.comp == (StreamMode{Compression: stream.CompressNone}) {
			rawBPP[fmt.Sprint(g.nominal, g.copyMode, g.content)] = g.bpp.Median
		}
	}
	for _, g := range groups {
		mc := boundAt(r.Bounds, "memcpy", g.dirty.Median)
		lb := boundAt(r.Bounds, "loopback", g.dirty.Median)
		fmt.Fprintf(b, "| %d | %s (%s) | %s | %v | %v | %d | %.0f (%.0f–%.0f) | %.0f | %.3f | %.0f (%.0f–%.0f) | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f (%.0f–%.0f) | %.1f | %.0f | %.0f | %.1f× | %.1f× |\n",
			g.nominal, g.copyMode, g.copyUsed, g.content, g.comp, g.epoch, g.n, g.dirty.Median, g.dirty.P25, g.dirty.P75,
			g.bpp.Median, g.bpp.Median/rawBPP[fmt.Sprint(g.nominal, g.copyMode, g.content)],
			g.pause.Median, g.pause.P25, g.pause.P75, g.stop.Median, g.harvest.Median, g.preHarvest.Median, g.copy.Median, g.state.Median, g.rest.Median,
			g.background.Median, g.ack.Median, g.ack.P25, g.ack.P75, g.length.Median, mc, lb, g.pause.Median/mc, g.ack.Median/lb)
	}
}

// reportCopies sets the copy modes side by side: for each working set,
// content and stream mode, each copy mode's pause, ack and pause + ack
// medians (auto: and the epochs that stopped and copied on write).
func (r *CheckpointResult) reportCopies(b *strings.Builder) {
	if len(r.Config.Copies) < 2 {
		return
	}
	type row struct {
		n       int
		content string
		comp    StreamMode
	}
	var rows []row
	by := map[row]map[string]sampleGroup{}
	for _, g := range groupSamples(r.Samples) {
		k := row{g.nominal, g.content, g.comp}
		if by[k] == nil {
			rows = append(rows, k)
			by[k] = map[string]sampleGroup{}
		}
		by[k][g.copyMode] = g
	}
	b.WriteString("\nThe copy modes side by side (medians over each run's epochs; *pause + ack* is taken per epoch: what the epoch's held output waits beyond the epoch). " +
		"*auto* is `--checkpoint-copy auto` with the default `--checkpoint-cow-pages` " + fmt.Sprint(replicate.DefaultCoWPages) +
		": each checkpoint stops to copy below that many dirty pages and copies on write from there; *used* counts its epochs of each.\n\n| working set | content | stream |")
	for _, c := range r.Config.Copies {
		fmt.Fprintf(b, " %[1]s pause µs | %[1]s ack µs | %[1]s pause + ack µs |", c)
	}
	b.WriteString(" used |\n|---|---|---|" + strings.Repeat("---|---|---|", len(r.Config.Copies)) + "---|\n")
	for _, k := range rows {
		fmt.Fprintf(b, "| %d | %s | %v |", k.n, k.content, k.comp)
		var used []string
		for _, c := range r.Config.Copies {
			g, ok := by[k][c]
			if !ok {
				b.WriteString(" | | |")
				continue
			}
			fmt.Fprintf(b, " %.0f | %.0f | %.0f |", g.pause.Median, g.ack.Median, g.pauseAck.Median)
			if c == CopyAuto {
				used = append(used, g.copyMix)
			}
		}
		fmt.Fprintf(b, " %s |\n", strings.Join(used, "; "))
	}
}

func (r *CheckpointResult) reportCompress(b *strings.Builder) {
	if len(r.Compress) == 0 {
		return
	}
	b.WriteString("\nThe sender's page codec alone (`checkpoint_compress.csv`): one epoch of the largest working set, its page sections built and compressed on one core as the sender does (best of three), " +
		"beside the stream's sealing (AES-256-GCM), which follows it on the same goroutine.\n\n")
	b.WriteString("| content | compression | pages | section MB | wire MB | ratio | MB/s per core (of section bytes) | ms per epoch |\n|---|---|---|---|---|---|---|---|\n")
	for _, c := range r.Compress {
		fmt.Fprintf(b, "| %s | %v | %d | %.1f | %.1f | %.3f | %.0f | %.1f |\n", c.Content, c.Compression, c.Pages, float64(c.In)/1e6, float64(c.Out)/1e6,
			float64(c.Out)/float64(c.In), float64(c.In)/c.Time.Seconds()/1e6, msOf(c.Time))
	}
}

// harvestKey is one harvest run: tracking mode and dirty set.
type harvestKey struct {
	tracking string
	n        int
}

// groupHarvests groups the harvest samples by run, in the order the runs
// came, with the runs that stopped early apart.
func groupHarvests(hs []HarvestSample) (keys []harvestKey, by map[harvestKey][]HarvestSample, failed map[harvestKey]string) {
	by, failed = map[harvestKey][]HarvestSample{}, map[harvestKey]string{}
	for _, s := range hs {
		k := harvestKey{s.Tracking, s.Nominal}
		if _, ok := by[k]; !ok {
			if _, ok := failed[k]; !ok {
				keys = append(keys, k)
			}
		}
		if s.Err != "" {
			failed[k] = s.Err
			continue
		}
		by[k] = append(by[k], s)
	}
	return keys, by, failed
}

func (r *CheckpointResult) reportHarvest(b *strings.Builder) {
	if len(r.Harvests) == 0 {
		return
	}
	b.WriteString("\nThe dirty-log harvest alone (`checkpoint_harvest.csv`), per tracking mode (`--dirty-tracking`): a one-vCPU guest writes exactly its working set once (a gated Dirtier: each pass waits for the VMM), " +
		"then the vCPU is paused, one `dirtylog.Tracker.Harvest` runs (bitmap: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG per slot; ring: collect each vCPU's ring + KVM_RESET_DIRTY_RINGS; both OR in the VMM's own bitmap), and the vCPU resumed, each timed apart. " +
		"The ring has 64k entries per vCPU (KVM's limit); *ring overflowed* means KVM wrote past entries not yet collected instead of stopping the vCPU (kvm_pvm does so), which the machine reports as an error.\n\n")
	b.WriteString("| dirty pages | tracking | cycles | harvest µs median (p25–p75) | harvest / bitmap | memcpy bound µs | vCPU pause µs median | vCPU resume µs median |\n|---|---|---|---|---|---|---|---|\n")
	keys, by, failed := groupHarvests(r.Harvests)
	bitmap := map[int]float64{}
	for _, k := range keys {
		if k.tracking == "bitmap" {
			bitmap[k.n] = harvestMedian(by[k])
		}
	}
	for _, k := range keys {
		if why, ok := failed[k]; ok && len(by[k]) == 0 {
			fmt.Fprintf(b, "| %d | %s | 0 | %s | | %.0f | | |\n", k.n, k.tracking, why, boundMedian(r.Bounds, "memcpy", k.n))
			continue
		}
		var h, p, rs []float64
		for _, s := range by[k] {
			h, p, rs = append(h, usOf(s.Harvest)), append(p, usOf(s.Pause)), append(rs, usOf(s.Resu))
		}
		sh := Summarize(h)
		fmt.Fprintf(b, "| %d | %s | %d | %.1f (%.1f–%.1f) | %.2f× | %.0f | %.0f | %.0f |\n", k.n, k.tracking, len(h), sh.Median, sh.P25, sh.P75,
			sh.Median/bitmap[k.n], boundMedian(r.Bounds, "memcpy", k.n), Summarize(p).Median, Summarize(rs).Median)
	}
}

// harvestMedian is the median harvest time of samples, in µs.
func harvestMedian(samples []HarvestSample) float64 {
	var h []float64
	for _, s := range samples {
		h = append(h, usOf(s.Harvest))
	}
	return Summarize(h).Median
}

func (r *CheckpointResult) reportBounds(b *strings.Builder) {
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
		fmt.Fprintf(b, "| %d | %.1f | %.1f |\n", n, boundMedian(r.Bounds, "memcpy", n), boundMedian(r.Bounds, "loopback", n))
	}
}
