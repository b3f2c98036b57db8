package bench

// The wire-guest suite's parsing: its flags' lists, and the primary's
// counters read off its /metrics page.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"govmm/replicate/stream"
)

// ParseStreamModes reads a comma-separated list of stream modes as the
// reports name them: none, s2, zstd, each optionally "+deltas".
func ParseStreamModes(s string) ([]StreamMode, error) {
	var out []StreamMode
	for _, f := range strings.Split(s, ",") {
		name, deltas := strings.CutSuffix(f, "+deltas")
		c, err := stream.ParseCompression(name)
		if err != nil || name == "" {
			return nil, fmt.Errorf("unknown stream mode %q (none, s2, zstd, each with or without +deltas)", f)
		}
		m := StreamMode{Compression: c, Deltas: deltas}
		for _, o := range out {
			if o == m {
				return nil, fmt.Errorf("stream mode %q given twice", f)
			}
		}
		out = append(out, m)
	}
	return out, nil
}

// CheckWireWindow checks a wire-guest window: 1s to 10 minutes.
func CheckWireWindow(d time.Duration) error {
	if d < time.Second || d > 10*time.Minute {
		return errors.New("want 1s to 10m0s")
	}
	return nil
}

// ParseWorkloads reads a comma-separated list of the suite's workloads.
func ParseWorkloads(s string) ([]string, error) {
	var out []string
	for _, w := range strings.Split(s, ",") {
		switch {
		case !slices.Contains(WireGuestWorkloads, w):
			return nil, fmt.Errorf("unknown workload %q (%s)", w, strings.Join(WireGuestWorkloads, ", "))
		case slices.Contains(out, w):
			return nil, fmt.Errorf("workload %q given twice", w)
		}
		out = append(out, w)
	}
	return out, nil
}

// WireCounters are the primary's checkpoint and stream counters (its
// /metrics), or their growth over a window.
type WireCounters struct {
	Epochs          float64 // govmm_replication_epochs_total
	DirtyPages      float64 // govmm_replication_dirty_pages_total
	CheckpointBytes float64 // govmm_replication_bytes_total: pages, state, framing, tags
	SentPages       float64 // govmm_stream_sent_pages_total
	ZeroPages       float64 // govmm_stream_sent_zero_pages_total
	DeltaPages      float64 // govmm_stream_sent_delta_pages_total
	CopyPages       float64 // govmm_stream_sent_copy_pages_total
	PageBytes       float64 // govmm_stream_sent_page_bytes_total: page sections before compression
	PageWireBytes   float64 // govmm_stream_sent_page_wire_bytes_total: as they travelled
	DiskBytes       float64 // govmm_stream_sent_disk_bytes_total: disk bytes written or zeroed
	DiskWireBytes   float64 // govmm_stream_sent_disk_wire_bytes_total: the Disk frames as they travelled
}

// wireMetricNames are the counters' metric names, in WireCounters' order.
var wireMetricNames = []string{"govmm_replication_epochs_total", "govmm_replication_dirty_pages_total",
	"govmm_replication_bytes_total", "govmm_stream_sent_pages_total", "govmm_stream_sent_zero_pages_total",
	"govmm_stream_sent_delta_pages_total", "govmm_stream_sent_copy_pages_total", "govmm_stream_sent_page_bytes_total", "govmm_stream_sent_page_wire_bytes_total",
	"govmm_stream_sent_disk_bytes_total", "govmm_stream_sent_disk_wire_bytes_total"}

func (c *WireCounters) fields() []*float64 {
	return []*float64{&c.Epochs, &c.DirtyPages, &c.CheckpointBytes, &c.SentPages, &c.ZeroPages, &c.DeltaPages, &c.CopyPages, &c.PageBytes, &c.PageWireBytes, &c.DiskBytes, &c.DiskWireBytes}
}

// Sub is c minus o, counter by counter.
func (c WireCounters) Sub(o WireCounters) WireCounters {
	of := o.fields()
	for i, f := range c.fields() {
		*f -= *of[i]
	}
	return c
}

// Add is c plus o, counter by counter.
func (c WireCounters) Add(o WireCounters) WireCounters {
	of := o.fields()
	for i, f := range c.fields() {
		*f += *of[i]
	}
	return c
}

// BytesPerDirtyPage is the checkpoints' bytes on the wire per dirty page
// (what 'govmm ctl stats' derives as "wire bytes per dirty page").
func (c WireCounters) BytesPerDirtyPage() float64 { return ratio(c.CheckpointBytes, c.DirtyPages) }

// TimesRaw is BytesPerDirtyPage over RawPageBytes.
func (c WireCounters) TimesRaw() float64 { return c.BytesPerDirtyPage() / RawPageBytes }

// PageRatio is what compression leaves of the page sections' bytes
// (sections in which deltas and copies may already have shrunk pages).
func (c WireCounters) PageRatio() float64 { return ratio(c.PageWireBytes, c.PageBytes) }

// PagesTimesRaw is the Pages frames' bytes on the wire per page sent, over
// RawPageBytes: what the pages alone cost against raw, from the stream's
// counters only (which grow together as pages are sent, so a window that
// cuts a long checkpoint does not skew it as it can TimesRaw).
func (c WireCounters) PagesTimesRaw() float64 {
	return ratio(c.PageWireBytes, c.SentPages*RawPageBytes)
}

// DiskRatio is the Disk frames' bytes on the wire over the disk bytes
// they wrote or zeroed: what compression leaves of the guest's disk
// writes (a zero run's frame is a few bytes for up to 1 MiB).
func (c WireCounters) DiskRatio() float64 { return ratio(c.DiskWireBytes, c.DiskBytes) }

// OtherPerCheckpoint is what a checkpoint's bytes on the wire hold
// besides its Pages and Disk frames, per checkpoint: the machine state,
// the frames' headers, the End frame, tags. (The checkpoint counters grow
// as a checkpoint ends, the stream's as its frames go: over a window of
// many checkpoints the difference is small.)
func (c WireCounters) OtherPerCheckpoint() float64 {
	return ratio(c.CheckpointBytes-c.PageWireBytes-c.DiskWireBytes, c.Epochs)
}

// ZeroShare is the share of the pages sent that were all zero.
func (c WireCounters) ZeroShare() float64 { return ratio(c.ZeroPages, c.SentPages) }

// DeltaShare is the share of the non-zero pages sent as XOR deltas.
func (c WireCounters) DeltaShare() float64 { return ratio(c.DeltaPages, c.SentPages-c.ZeroPages) }

// CopyShare is the share of the non-zero pages sent as copies of a page
// the standby holds.
func (c WireCounters) CopyShare() float64 { return ratio(c.CopyPages, c.SentPages-c.ZeroPages) }

func ratio(n, d float64) float64 {
	if d <= 0 {
		return nan
	}
	return n / d
}

var nan = math.NaN()

// Metrics is one scrape of a Prometheus text page: each sample's value by
// its series as written ("name" or "name{labels}").
type Metrics map[string]float64

// ParseMetrics reads a Prometheus text exposition (comments skipped).
func ParseMetrics(r io.Reader) (Metrics, error) {
	m := Metrics{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' {
			continue
		}
		// The value follows the series; label values may hold spaces.
		i := strings.LastIndexByte(l, '}')
		if i < 0 {
			i = strings.IndexByte(l, ' ') - 1
		}
		if i < 0 || i+1 >= len(l) {
			return nil, fmt.Errorf("metrics: no value in %q", l)
		}
		series, rest := l[:i+1], strings.Fields(l[i+1:])
		if len(rest) == 0 {
			return nil, fmt.Errorf("metrics: no value in %q", l)
		}
		v, err := strconv.ParseFloat(rest[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: %q: %w", l, err)
		}
		m[series] = v
	}
	return m, sc.Err()
}

// Counters picks the suite's counters out of a scrape; a counter the VMM
// does not serve is an error (an older govmm).
func (m Metrics) Counters() (WireCounters, error) {
	var c WireCounters
	for i, f := range c.fields() {
		v, ok := m[wireMetricNames[i]]
		if !ok {
			return c, fmt.Errorf("metrics: no %s", wireMetricNames[i])
		}
		*f = v
	}
	return c, nil
}

var infoLabels = regexp.MustCompile(`^govmm_stream_info\{(.*)\}$`)

// StreamInfo is the stream mode the two ends agreed on, from
// govmm_stream_info (ok false before the handshake).
func (m Metrics) StreamInfo() (mode StreamMode, ok bool) {
	for series, v := range m {
		sm := infoLabels.FindStringSubmatch(series)
		if sm == nil || v != 1 {
			continue
		}
		labels := map[string]string{}
		for _, kv := range strings.Split(sm[1], ",") {
			k, val, _ := strings.Cut(kv, "=")
			labels[strings.TrimSpace(k)] = strings.Trim(strings.TrimSpace(val), `"`)
		}
		c, err := stream.ParseCompression(labels["compression"])
		if err != nil {
			continue
		}
		return StreamMode{Compression: c, Deltas: labels["deltas"] == "true"}, true
	}
	return StreamMode{}, false
}
