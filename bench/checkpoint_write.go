package bench

import (
	"fmt"
	"path/filepath"
	"strconv"
)

// write saves the suite's CSVs and plots in dir.
func (r *CheckpointResult) write(dir string) error {
	for _, f := range []func(string) error{r.writeEpochs, r.writeCompress, r.writeHarvests, r.writeBounds} {
		if err := f(dir); err != nil {
			return err
		}
	}
	return r.plot(dir)
}

func (r *CheckpointResult) writeEpochs(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		es := s.Stats
		rows = append(rows, []string{strconv.Itoa(s.Nominal), ftoa(msOf(s.Epoch), 1), strconv.FormatUint(es.Epoch, 10),
			strconv.Itoa(es.DirtyPages), ftoa(usOf(es.Pause), 1), ftoa(usOf(es.Stop), 1), ftoa(usOf(es.Harvest), 1),
			ftoa(usOf(es.Copy), 1), ftoa(usOf(es.State), 1), ftoa(usOf(restOf(es)), 1), ftoa(usOf(es.AckTime), 1),
			ftoa(msOf(es.Length), 3), strconv.FormatUint(es.Bytes, 10), s.Copy, es.CopyMode, ftoa(usOf(es.Background), 1),
			s.Mode.String(), s.Content, ftoa(bytesPerPage(es), 1), ftoa(usOf(es.PreHarvest), 1)})
	}
	return writeCSV(filepath.Join(dir, "checkpoint.csv"), []string{"nominal_pages", "epoch_ms", "epoch", "dirty_pages",
		"pause_us", "stop_us", "harvest_us", "copy_us", "state_us", "rest_us", "ack_us", "length_ms", "bytes",
		"copy", "copy_used", "background_us", "stream", "content", "bytes_per_dirty_page", "preharvest_us"}, rows)
}

func (r *CheckpointResult) writeCompress(dir string) error {
	var rows [][]string
	for _, c := range r.Compress {
		rows = append(rows, []string{c.Compression.String(), c.Content, strconv.Itoa(c.Pages), strconv.Itoa(c.In), strconv.Itoa(c.Out),
			ftoa(usOf(c.Time), 1)})
	}
	return writeCSV(filepath.Join(dir, "checkpoint_compress.csv"), []string{"compression", "content", "pages", "section_bytes",
		"wire_bytes", "time_us"}, rows)
}

func (r *CheckpointResult) writeHarvests(dir string) error {
	var rows [][]string
	for _, s := range r.Harvests {
		if s.Err != "" {
			rows = append(rows, []string{s.Tracking, strconv.Itoa(s.Nominal), "", "", "", "", s.Err})
			continue
		}
		rows = append(rows, []string{s.Tracking, strconv.Itoa(s.Nominal), strconv.Itoa(s.DirtyPages), ftoa(usOf(s.Pause), 1),
			ftoa(usOf(s.Harvest), 1), ftoa(usOf(s.Resu), 1), ""})
	}
	return writeCSV(filepath.Join(dir, "checkpoint_harvest.csv"), []string{"tracking", "nominal_pages", "dirty_pages",
		"vcpu_pause_us", "harvest_us", "vcpu_resume_us", "error"}, rows)
}

func (r *CheckpointResult) writeBounds(dir string) error {
	var rows [][]string
	for _, b := range r.Bounds {
		rows = append(rows, []string{b.Kind, strconv.Itoa(b.Pages), ftoa(usOf(b.Time), 1)})
	}
	return writeCSV(filepath.Join(dir, "checkpoint_bounds.csv"), []string{"kind", "pages", "time_us"}, rows)
}

// plot draws the suite's charts, all on log–log axes: the quantities span
// decades from 100 to 64k pages.
func (r *CheckpointResult) plot(dir string) error {
	groups := groupSamples(r.Samples)
	if len(groups) == 0 {
		return fmt.Errorf("checkpoint: no epochs to plot")
	}
	for _, f := range []func(string, []sampleGroup) error{r.plotPause, r.plotBreakdown, r.plotStream, r.plotHarvest} {
		if err := f(dir, groups); err != nil {
			return err
		}
	}
	return nil
}

// boundSeries is the median of each measured count of a bound, as a
// dashed line.
func (r *CheckpointResult) boundSeries(kind, name string) Series {
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

// firstOf keeps the groups of the first content and the first stream mode
// (the copy and stream plots vary one dimension each, the rest held).
func firstOf(groups []sampleGroup, sameStream bool) []sampleGroup {
	var out []sampleGroup
	for _, g := range groups {
		if g.content == groups[0].content && (!sameStream || g.comp == groups[0].comp) && (sameStream || g.copyMode == groups[0].copyMode) {
			out = append(out, g)
		}
	}
	return out
}

// plotPause draws the pause and time to ack against the dirty pages, one
// line per copy mode, beside the memcpy and loopback bounds.
func (r *CheckpointResult) plotPause(dir string, groups []sampleGroup) error {
	var series []Series
	byCopy := map[string]*[2]Series{}
	var order []string
	for _, g := range firstOf(groups, true) {
		s, ok := byCopy[g.copyMode]
		if !ok {
			s = &[2]Series{{Name: "pause, " + g.copyMode + " (median per run)", Line: true},
				{Name: "time to ack, " + g.copyMode + " (median per run)", Line: true}}
			byCopy[g.copyMode] = s
			order = append(order, g.copyMode)
		}
		s[0].X, s[0].Y = append(s[0].X, g.dirty.Median), append(s[0].Y, g.pause.Median)
		s[1].X, s[1].Y = append(s[1].X, g.dirty.Median), append(s[1].Y, g.ack.Median)
	}
	for _, c := range order {
		series = append(series, byCopy[c][0], byCopy[c][1])
	}
	series = append(series, r.boundSeries("memcpy", "memcpy bound (copy() N pages)"),
		r.boundSeries("loopback", "loopback bound (N×4 KiB over TCP + ack)"))
	return lineChart(filepath.Join(dir, "checkpoint_pause.png"), "Checkpoint pause and ack vs dirty pages, per copy mode",
		"dirty pages per epoch (measured median of the run)", "time (µs)", LogLog, series)
}

// plotBreakdown draws each step of the pause of the first copy mode,
// content and stream mode: stacked bars on a linear axis flattened the
// small working sets, where the fixed costs are the whole pause.
func (r *CheckpointResult) plotBreakdown(dir string, groups []sampleGroup) error {
	steps := []Series{
		{Name: "whole pause", Line: true, Dashed: true},
		{Name: "stop vCPUs + quiesce", Line: true},
		{Name: "harvest", Line: true},
		{Name: "copy to staging", Line: true},
		{Name: "save state", Line: true},
		{Name: "resume (rest)", Line: true},
	}
	for _, g := range firstOf(firstOf(groups, true), false) {
		for i, v := range []float64{g.pause.Median, g.stop.Median, g.harvest.Median, g.copy.Median, g.state.Median, g.rest.Median} {
			steps[i].X, steps[i].Y = append(steps[i].X, g.dirty.Median), append(steps[i].Y, v)
		}
	}
	return lineChart(filepath.Join(dir, "checkpoint_breakdown.png"), fmt.Sprintf("Pause broken into steps (medians per run, epoch %v)", groups[0].epoch),
		"dirty pages per epoch (measured median of the run)", "time (µs)", LogLog, steps)
}

// plotStream draws, per stream mode, the time to ack against the dirty
// pages beside the loopback bound, and the wire bytes per dirty page.
func (r *CheckpointResult) plotStream(dir string, groups []sampleGroup) error {
	var ack, wire []Series
	idx := map[string]int{}
	for _, g := range firstOf(groups, false) {
		name := g.comp.String()
		i, ok := idx[name]
		if !ok {
			i = len(ack)
			idx[name] = i
			ack = append(ack, Series{Name: "time to ack, " + name, Line: true})
			wire = append(wire, Series{Name: name, Line: true})
		}
		ack[i].X, ack[i].Y = append(ack[i].X, g.dirty.Median), append(ack[i].Y, g.ack.Median)
		wire[i].X, wire[i].Y = append(wire[i].X, g.dirty.Median), append(wire[i].Y, g.bpp.Median)
	}
	ack = append(ack, r.boundSeries("loopback", "loopback bound (N×4 KiB over TCP + ack)"))
	err := lineChart(filepath.Join(dir, "checkpoint_stream.png"), "Time to ack per stream mode ("+groups[0].content+" pages)",
		"dirty pages per epoch (measured median of the run)", "time (µs)", LogLog, ack)
	if err != nil {
		return err
	}
	return lineChart(filepath.Join(dir, "checkpoint_wire.png"), "Wire bytes per dirty page per stream mode ("+groups[0].content+" pages)",
		"dirty pages per epoch (measured median of the run)", "bytes on the wire per dirty page", LogLog, wire)
}

// plotHarvest draws the harvest alone against the dirty pages, one line
// per tracking mode, beside the memcpy bound of the same pages.
func (r *CheckpointResult) plotHarvest(dir string, _ []sampleGroup) error {
	keys, by, _ := groupHarvests(r.Harvests)
	idx := map[string]int{}
	var series []Series
	for _, k := range keys {
		if len(by[k]) == 0 {
			continue
		}
		i, ok := idx[k.tracking]
		if !ok {
			i = len(series)
			idx[k.tracking] = i
			series = append(series, Series{Name: "harvest, " + k.tracking + " (median)", Line: true})
		}
		series[i].X, series[i].Y = append(series[i].X, float64(k.n)), append(series[i].Y, harvestMedian(by[k]))
	}
	series = append(series, r.boundSeries("memcpy", "memcpy bound (copy() N pages)"))
	return lineChart(filepath.Join(dir, "checkpoint_harvest.png"), "Dirty-log harvest alone vs dirty pages, bitmap and ring",
		"dirty pages", "time (µs)", LogLog, series)
}
