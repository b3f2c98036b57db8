package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"govmm/ctlapi"
)

func TestHumanDuration(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"},
		{500 * time.Nanosecond, "500ns"},
		{539722 * time.Nanosecond, "540µs"},
		{time.Millisecond + 234*time.Microsecond, "1.23ms"},
		{25*time.Millisecond + 300*time.Microsecond, "25.3ms"},
		{2 * time.Second, "2s"},
		{1200 * time.Microsecond, "1.2ms"},
		{90*time.Second + 400*time.Millisecond, "1m30s"},
	} {
		assert.Equal(t, tt.want, humanDuration(tt.d), "%d ns", int64(tt.d))
	}
}

func TestHumanValue(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		v    float64
		want string
	}{
		{"govmm_replication_last_pause_seconds", 0.000539722, "540µs"},
		{"govmm_replication_backpressure_seconds_total", 1.5, "1.5s"},
		{"govmm_replication_bytes_total", 12.3 * (1 << 20), "12.3 MiB"},
		{"govmm_output_held_bytes", 512, "512 B"},
		{"govmm_replication_epochs_total", 1234, "1234"},
		{"govmm_replication_protected", 1, "1"},
	} {
		assert.Equal(t, tt.want, humanValue(tt.name, tt.v), tt.name)
	}
}

// A histogram is one line of ctl stats: count, mean and the buckets that
// hold the median and the 99th percentile.
func TestStatsRowsHistogram(t *testing.T) {
	t.Parallel()
	h := func(name string, le string, v float64) ctlapi.Metric {
		m := ctlapi.Metric{Name: name, Type: "histogram", Value: v}
		if le != "" {
			m.Labels = map[string]string{"le": le}
		}
		return m
	}
	rows := statsRows([]ctlapi.Metric{
		{Name: "govmm_paused", Type: "gauge", Value: 0},
		h("govmm_replication_pause_seconds_bucket", "0.0005", 60),
		h("govmm_replication_pause_seconds_bucket", "0.001", 99),
		h("govmm_replication_pause_seconds_bucket", "+Inf", 100),
		h("govmm_replication_pause_seconds_sum", "", 0.054),
		h("govmm_replication_pause_seconds_count", "", 100),
		h("govmm_replication_ack_seconds_bucket", "0.001", 0),
		h("govmm_replication_ack_seconds_bucket", "+Inf", 2),
		h("govmm_replication_ack_seconds_sum", "", 4),
		h("govmm_replication_ack_seconds_count", "", 2),
	})
	assert.Equal(t, []statsRow{
		{"govmm_paused", "-", "0"},
		{"govmm_replication_pause_seconds", "-", "n=100 mean=540µs p50<=500µs p99<=1ms"},
		{"govmm_replication_ack_seconds", "-", "n=2 mean=2s p50>1ms p99>1ms"},
	}, rows)
}

// ctl stats derives its figures from the counters, and leaves out those
// whose divisor is still zero.
func TestDeriveStats(t *testing.T) {
	t.Parallel()
	c := func(name string, v float64) ctlapi.Metric {
		return ctlapi.Metric{Name: name, Type: "counter", Value: v}
	}
	got := deriveStats([]ctlapi.Metric{
		c("govmm_replication_bytes_total", 185000),
		c("govmm_replication_dirty_pages_total", 1000),
		c("govmm_stream_sent_page_bytes_total", 4000),
		c("govmm_stream_sent_page_wire_bytes_total", 1000),
		c("govmm_stream_sent_disk_bytes_total", 1<<20),
		c("govmm_stream_sent_disk_wire_bytes_total", 1<<18),
		c("govmm_stream_sent_state_bytes_total", 18000),
		c("govmm_stream_sent_state_wire_bytes_total", 900),
		c("govmm_stream_sent_pages_total", 110),
		c("govmm_stream_sent_zero_pages_total", 10),
		c("govmm_stream_sent_delta_pages_total", 90),
		c("govmm_stream_sent_copy_pages_total", 5),
		c("govmm_stream_received_pages_total", 0),
		c("govmm_stream_received_zero_pages_total", 0),
		c("govmm_stream_received_delta_pages_total", 0),
	})
	var rows []string
	for _, d := range got {
		rows = append(rows, d.Name+" "+humanDerived(d))
	}
	assert.Equal(t, []string{
		"wire bytes per dirty page 185 B",
		"page bytes on the wire / raw 0.25×",
		"state bytes on the wire / raw 0.05×",
		"disk bytes on the wire / written 0.25×",
		"pages sent as deltas 90.0%",
		"pages sent as copies 5.0%",
	}, rows)
	assert.Empty(t, deriveStats([]ctlapi.Metric{c("govmm_replication_bytes_total", 0), c("govmm_replication_dirty_pages_total", 0)}),
		"no checkpoint yet: no figure")
}
