package replicate

import (
	"bytes"
	"log/slog"
	"testing"
	"time"

	"govmm/replicate/stream"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A duration lands in the first bucket whose bound is not below it (a
// bucket's bound is inclusive, as Prometheus' le says), and the exported
// buckets are cumulative, in increasing le, ending with +Inf = count.
func TestHistogramObserve(t *testing.T) {
	t.Parallel()
	var h Histogram
	for _, d := range []time.Duration{
		0,
		100 * time.Microsecond, // on the first bound: first bucket
		101 * time.Microsecond, // just above: second
		3 * time.Millisecond,   // 2.5ms < d <= 5ms
		10 * time.Second,       // the last bound
		time.Minute,            // over every bound: +Inf only
	} {
		h.Observe(d)
	}
	require.Equal(t, uint64(6), h.Count)
	require.Equal(t, time.Minute+10*time.Second+3*time.Millisecond+201*time.Microsecond, h.Sum)

	ms := h.metrics("x_seconds", "help")
	require.Len(t, ms, len(DurationBuckets)+3)
	want := map[string]float64{"0.0001": 2, "0.00025": 3, "0.0025": 3, "0.005": 4, "5": 4, "10": 5, "+Inf": 6}
	prev := -1.0
	for i, m := range ms[:len(DurationBuckets)+1] {
		assert.Equal(t, "x_seconds_bucket", m.Name)
		assert.Equal(t, "histogram", m.Type)
		assert.GreaterOrEqual(t, m.Value, prev, "cumulative")
		prev = m.Value
		if w, ok := want[m.Labels["le"]]; ok {
			assert.Equal(t, w, m.Value, "le=%s", m.Labels["le"])
		}
		if i < len(DurationBuckets) {
			assert.Equal(t, DurationBuckets[i].Seconds(), parseLE(t, m.Labels["le"]))
		}
	}
	assert.Equal(t, "+Inf", ms[len(DurationBuckets)].Labels["le"])
	sum, count := ms[len(ms)-2], ms[len(ms)-1]
	assert.Equal(t, Metric{Name: "x_seconds_sum", Help: "help", Type: "histogram", Value: h.Sum.Seconds()}, sum)
	assert.Equal(t, Metric{Name: "x_seconds_count", Help: "help", Type: "histogram", Value: 6}, count)
}

func parseLE(t *testing.T, s string) float64 {
	t.Helper()
	d, err := time.ParseDuration(s + "s")
	require.NoError(t, err)
	return d.Seconds()
}

// The replicator's metrics carry pause and ack as histograms, not as
// quantile-labelled gauges.
func TestReplicatorMetricsHistograms(t *testing.T) {
	t.Parallel()
	r := &Replicator{}
	r.record(EpochStats{Epoch: 1, Pause: 300 * time.Microsecond})
	r.record(EpochStats{Epoch: 2, Pause: 7 * time.Millisecond})
	r.totals.Ack.Observe(2 * time.Millisecond)
	got := map[string]Metric{}
	for _, m := range r.Metrics() {
		assert.NotContains(t, m.Labels, "quantile", m.Name)
		key := m.Name
		if le, ok := m.Labels["le"]; ok {
			key += "{le=" + le + "}"
		}
		got[key] = m
	}
	assert.Equal(t, 2.0, got["govmm_replication_pause_seconds_count"].Value)
	assert.InDelta(t, 0.0073, got["govmm_replication_pause_seconds_sum"].Value, 1e-12)
	assert.Equal(t, 0.0, got["govmm_replication_pause_seconds_bucket{le=0.00025}"].Value)
	assert.Equal(t, 1.0, got["govmm_replication_pause_seconds_bucket{le=0.0005}"].Value)
	assert.Equal(t, 2.0, got["govmm_replication_pause_seconds_bucket{le=+Inf}"].Value)
	assert.Equal(t, 1.0, got["govmm_replication_ack_seconds_count"].Value)
	assert.Equal(t, "histogram", got["govmm_replication_ack_seconds_sum"].Type)
	assert.Equal(t, 2.0, got["govmm_replication_epochs_total"].Value)
}

// The epoch length the loop aims at is a gauge, and each checkpoint's
// stats carry the one it was taken under.
func TestReplicatorMetricsEpochTarget(t *testing.T) {
	t.Parallel()
	r := &Replicator{target: 40 * time.Millisecond}
	r.record(EpochStats{Epoch: 1})
	var found bool
	for _, m := range r.Metrics() {
		if m.Name == "govmm_replication_epoch_target_seconds" {
			found = true
			assert.Equal(t, "gauge", m.Type)
			assert.InDelta(t, 0.040, m.Value, 1e-12)
		}
	}
	assert.True(t, found)
	assert.Equal(t, 40*time.Millisecond, r.Recent()[0].Target)
	assert.Equal(t, 40*time.Millisecond, r.Stats().EpochLength)
}

// The checkpoints are counted by how they copied their pages (auto
// mixes them): a counter per copy mode, summing to the epochs.
// At debug level each checkpoint's breakdown is logged; above it, nothing.
func TestReplicatorLogsEachCheckpointAtDebug(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo} {
		var buf bytes.Buffer
		r := &Replicator{log: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: level}))}
		r.record(EpochStats{Epoch: 7, CopyMode: "stop", DirtyPages: 150, Pause: 23 * time.Millisecond,
			Stop: 14 * time.Millisecond, Harvest: 300 * time.Microsecond, Copy: 600 * time.Microsecond, State: 3 * time.Millisecond})
		if level == slog.LevelInfo {
			assert.Empty(t, buf.String())
			continue
		}
		for _, want := range []string{"msg=checkpoint", "epoch=7", "copy=stop", "dirty_pages=150", "pause=23ms", "stop=14ms",
			"harvest=300µs", "copy_time=600µs", "state=3ms"} {
			assert.Contains(t, buf.String(), want)
		}
	}
}

func TestReplicatorMetricsCopyModes(t *testing.T) {
	t.Parallel()
	r := &Replicator{}
	for i, m := range []CopyMode{CopyStop, CopyCoW, CopyCoW, CopyStop, CopyStop} {
		r.record(EpochStats{Epoch: uint64(i + 1), CopyMode: string(m)})
	}
	got := map[string]float64{}
	for _, m := range r.Metrics() {
		if m.Name == "govmm_replication_copy_epochs_total" {
			assert.Equal(t, "counter", m.Type)
			got[m.Labels["copy"]] = m.Value
		}
	}
	assert.Equal(t, map[string]float64{"stop": 3, "cow": 2}, got)
	assert.Equal(t, uint64(2), r.Stats().CoWEpochs)
}

// A sender's stream metrics count pages and their bytes before and after
// compression, disk bytes and its polls for acks; a receiver's, pages
// and disk bytes (it does not count page bytes) and its polls inside a
// checkpoint;
// the codec is an info metric once the two ends agreed on one.
func TestStreamMetrics(t *testing.T) {
	t.Parallel()
	names := func(ms []Metric) map[string]Metric {
		out := map[string]Metric{}
		for _, m := range ms {
			out[m.Name] = m
		}
		return out
	}
	st := stream.Stats{Pages: 10, ZeroPages: 2, DeltaPages: 5, CopyPages: 1, PageBytes: 4000, PageWireBytes: 900, DiskBytes: 1 << 20, DiskWireBytes: 1 << 19,
		StateBytes: 18000, StateWireBytes: 600,
		PollHits: 7, PollMisses: 3, Compression: "s2", Deltas: true, Cipher: "aegis-128l", SendBuffer: 256 << 10}
	sent := names(StreamMetrics(st, true))
	assert.Len(t, sent, 14)
	assert.Equal(t, float64(256<<10), sent["govmm_stream_send_buffer_bytes"].Value)
	assert.Equal(t, "gauge", sent["govmm_stream_send_buffer_bytes"].Type)
	assert.Equal(t, 18000.0, sent["govmm_stream_sent_state_bytes_total"].Value)
	assert.Equal(t, 600.0, sent["govmm_stream_sent_state_wire_bytes_total"].Value)
	assert.Equal(t, float64(1<<19), sent["govmm_stream_sent_disk_wire_bytes_total"].Value)
	assert.Equal(t, float64(1<<20), sent["govmm_stream_sent_disk_bytes_total"].Value)
	assert.Equal(t, 900.0, sent["govmm_stream_sent_page_wire_bytes_total"].Value)
	assert.Equal(t, "counter", sent["govmm_stream_sent_page_wire_bytes_total"].Type)
	assert.Equal(t, 4000.0, sent["govmm_stream_sent_page_bytes_total"].Value)
	assert.Equal(t, 5.0, sent["govmm_stream_sent_delta_pages_total"].Value)
	assert.Equal(t, 1.0, sent["govmm_stream_sent_copy_pages_total"].Value)
	assert.Equal(t, Metric{Name: "govmm_stream_info", Help: sent["govmm_stream_info"].Help, Type: "gauge", Value: 1,
		Labels: map[string]string{"compression": "s2", "deltas": "true", "cipher": "aegis-128l"}}, sent["govmm_stream_info"])
	recv := names(StreamMetrics(st, false))
	assert.Len(t, recv, 8)
	assert.Equal(t, 7.0, recv["govmm_stream_received_poll_hits_total"].Value)
	assert.Equal(t, 3.0, recv["govmm_stream_received_poll_misses_total"].Value)
	assert.Equal(t, 7.0, sent["govmm_stream_sent_ack_poll_hits_total"].Value)
	assert.Equal(t, 3.0, sent["govmm_stream_sent_ack_poll_misses_total"].Value)
	assert.NotContains(t, recv, "govmm_stream_received_ack_poll_hits_total", "a receiver awaits no ack")
	assert.NotContains(t, recv, "govmm_stream_send_buffer_bytes", "a receiver sends only acks and heartbeats")
	assert.Equal(t, float64(1<<20), recv["govmm_stream_received_disk_bytes_total"].Value)
	assert.Equal(t, 10.0, recv["govmm_stream_received_pages_total"].Value)
	assert.Equal(t, 2.0, recv["govmm_stream_received_zero_pages_total"].Value)
	assert.NotContains(t, names(StreamMetrics(stream.Stats{}, false)), "govmm_stream_info", "no codec before the handshake")
}
