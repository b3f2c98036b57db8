package main

// ctl stats for a person: each sample in the unit its name says, a
// histogram in one line, and the figures derived from several samples.

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"govmm/ctlapi"
)

// deriveStats computes, from a VMM's metrics, the figures that take
// several of them: on a primary, the wire bytes per dirty page of its
// checkpoints (as 'govmm bench checkpoint' reports it), what compression
// leaves of the pages' sections, and the shares of pages sent as deltas
// and as copies; on a standby, the shares received so. A figure whose
// divisor is still zero is left out.
func deriveStats(ms []ctlapi.Metric) []ctlapi.Derived {
	v := map[string]float64{}
	for _, m := range ms {
		if len(m.Labels) == 0 {
			v[m.Name] = m.Value
		}
	}
	var out []ctlapi.Derived
	ratio := func(name, help, unit, num, den string, denMinus ...string) {
		d, ok := v[den]
		for _, m := range denMinus {
			d -= v[m]
		}
		if n, hasNum := v[num]; ok && hasNum && d > 0 {
			out = append(out, ctlapi.Derived{Name: name, Help: help, Unit: unit, Value: n / d})
		}
	}
	ratio("wire bytes per dirty page", "checkpoints' bytes on the wire (pages, state, frame headers, tags) per dirty page",
		"bytes", "govmm_replication_bytes_total", "govmm_replication_dirty_pages_total")
	ratio("page bytes on the wire / raw", "what compression leaves of the pages' sections (a delta counted as its XOR page, a copy as its 12 bytes)",
		"ratio", "govmm_stream_sent_page_wire_bytes_total", "govmm_stream_sent_page_bytes_total")
	ratio("state bytes on the wire / raw", "what sending the machine state as its XOR with the last checkpoint's, compressed, leaves of it",
		"ratio", "govmm_stream_sent_state_wire_bytes_total", "govmm_stream_sent_state_bytes_total")
	ratio("disk bytes on the wire / written", "what compression leaves of the disk writes' bytes (a zero run counted as its few bytes for its length)",
		"ratio", "govmm_stream_sent_disk_wire_bytes_total", "govmm_stream_sent_disk_bytes_total")
	for _, dir := range []string{"sent", "received"} {
		p := "govmm_stream_" + dir + "_"
		ratio("pages "+dir+" as deltas", "of the non-zero pages "+dir+", those that travelled as XOR deltas",
			"fraction", p+"delta_pages_total", p+"pages_total", p+"zero_pages_total")
		ratio("pages "+dir+" as copies", "of the non-zero pages "+dir+", those that travelled as a reference to a page with the same bytes",
			"fraction", p+"copy_pages_total", p+"pages_total", p+"zero_pages_total")
	}
	return out
}

// humanDerived writes a derived figure in its unit: 4.2 B, 185 B, 2.3 KiB,
// 0.0337×, 89.7%.
func humanDerived(d ctlapi.Derived) string {
	switch {
	case d.Unit == "bytes" && d.Value < 10:
		return strconv.FormatFloat(d.Value, 'f', 1, 64) + " B"
	case d.Unit == "bytes" && d.Value < 1024:
		return strconv.FormatFloat(d.Value, 'f', 0, 64) + " B"
	case d.Unit == "bytes":
		return ctlBytes(uint64(d.Value))
	case d.Unit == "ratio":
		return strconv.FormatFloat(d.Value, 'g', 3, 64) + "×"
	case d.Unit == "fraction":
		return strconv.FormatFloat(100*d.Value, 'f', 1, 64) + "%"
	}
	return strconv.FormatFloat(d.Value, 'g', 4, 64)
}

// statsRow is one line of ctl stats.
type statsRow struct{ name, labels, value string }

// statsRows turns samples (in the server's sorted order) into lines for a
// person: durations and sizes in units, and each histogram in one line
// (count, mean and quantiles read off its buckets) instead of its
// buckets.
func statsRows(ms []ctlapi.Metric) []statsRow {
	var rows []statsRow
	hists := map[string]*statsHist{} // by family and labels
	for _, m := range ms {
		if m.Type == "histogram" {
			base, part := histPart(m.Name)
			lk := labelText(m.Labels, "le")
			h := hists[base+lk]
			if h == nil {
				h = &statsHist{seconds: strings.HasSuffix(base, "_seconds")}
				hists[base+lk] = h
				rows = append(rows, statsRow{name: base, labels: lk})
				h.row = len(rows) - 1
			}
			h.add(part, m)
			continue
		}
		rows = append(rows, statsRow{name: m.Name, labels: labelText(m.Labels, ""), value: humanValue(m.Name, m.Value)})
	}
	for _, h := range hists {
		rows[h.row].value = h.String()
	}
	return rows
}

// histPart splits a histogram sample's name into its family and part
// (bucket, sum or count).
func histPart(name string) (base, part string) {
	for _, p := range []string{"_bucket", "_sum", "_count"} {
		if b, ok := strings.CutSuffix(name, p); ok {
			return b, p[1:]
		}
	}
	return name, ""
}

// labelText writes labels sorted, leaving out skip; "-" for none.
func labelText(labels map[string]string, skip string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		if k != skip {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%q", k, labels[k])
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

// statsHist gathers one histogram's samples.
type statsHist struct {
	row        int
	seconds    bool
	le         []float64 // bucket bounds, in the order served (increasing)
	cum        []float64 // cumulative counts
	sum, count float64
}

func (h *statsHist) add(part string, m ctlapi.Metric) {
	switch part {
	case "bucket":
		le, err := strconv.ParseFloat(m.Labels["le"], 64)
		if err != nil {
			le = math.Inf(1)
		}
		h.le, h.cum = append(h.le, le), append(h.cum, m.Value)
	case "sum":
		h.sum = m.Value
	case "count":
		h.count = m.Value
	}
}

// String is "n=1234 mean=540µs p50<=500µs p99<=5ms": a quantile is the
// bound of the first bucket that holds it, which is all a histogram
// knows.
func (h *statsHist) String() string {
	unit := func(v float64) string {
		if h.seconds {
			return humanSeconds(v)
		}
		return ctlValue(v)
	}
	if h.count == 0 {
		return "n=0"
	}
	s := fmt.Sprintf("n=%s mean=%s", ctlValue(h.count), unit(h.sum/h.count))
	for _, q := range []struct {
		name string
		q    float64
	}{{"p50", 0.5}, {"p99", 0.99}} {
		for i, c := range h.cum {
			if c >= q.q*h.count {
				if math.IsInf(h.le[i], 1) {
					bound := "?"
					if i > 0 {
						bound = unit(h.le[i-1])
					}
					s += fmt.Sprintf(" %s>%s", q.name, bound)
				} else {
					s += fmt.Sprintf(" %s<=%s", q.name, unit(h.le[i]))
				}
				break
			}
		}
	}
	return s
}

// humanValue writes a metric's value for a person, in the unit its name
// says (Prometheus names carry base units: seconds, bytes).
func humanValue(name string, v float64) string {
	base := strings.TrimSuffix(name, "_total")
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return ctlValue(v)
	case strings.HasSuffix(base, "_seconds"):
		return humanSeconds(v)
	case strings.HasSuffix(base, "_bytes") && v >= 0 && v < math.MaxUint64:
		return ctlBytes(uint64(v))
	}
	return ctlValue(v)
}

// humanSeconds writes seconds as humanDuration does: 540µs, 1.23ms,
// 25.3s, 1h2m3s.
func humanSeconds(v float64) string {
	if v < 0 {
		return "-" + humanSeconds(-v)
	}
	return humanDuration(time.Duration(v * float64(time.Second)))
}

// humanDuration writes d with up to three significant digits below a
// minute: 0s, 12ns, 540µs, 1.23ms, 2s, 25.3s; from a minute on, to the
// second.
func humanDuration(d time.Duration) string {
	if d >= time.Minute {
		return d.Round(time.Second).String()
	}
	for _, u := range []struct {
		unit time.Duration
		name string
	}{{time.Second, "s"}, {time.Millisecond, "ms"}, {time.Microsecond, "µs"}} {
		if d >= u.unit {
			v := float64(d) / float64(u.unit)
			s := strconv.FormatFloat(v, 'f', max(0, 2-int(math.Floor(math.Log10(v)))), 64)
			if strings.Contains(s, ".") {
				s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
			}
			return s + u.name
		}
	}
	return d.String()
}

// ctlBytes writes n in binary units: 512 B, 1.5 KiB, 256 MiB.
func ctlBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for v >= unit && i < 5 {
		v /= unit
		i++
	}
	s := fmt.Sprintf("%.1f", v)
	s = strings.TrimSuffix(s, ".0")
	return s + " " + []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}[i]
}

// ctlDuration rounds d to what a person reads: ms above a second, µs below.
func ctlDuration(d time.Duration) string {
	switch {
	case d >= time.Second:
		return d.Round(time.Millisecond).String()
	case d >= time.Millisecond:
		return d.Round(time.Microsecond).String()
	}
	return d.String()
}

// ctlValue writes a metric value: integers without an exponent.
func ctlValue(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e15 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%g", v)
}
