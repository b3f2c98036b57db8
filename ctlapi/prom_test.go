package ctlapi

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/promcheck"
)

var promStats = Stats{Metrics: []Metric{
	{Name: "govmm_vcpu_exits_total", Help: "KVM_RUN exits by reason.", Type: "counter", Labels: map[string]string{"vcpu": "10", "reason": "io"}, Value: 1234},
	{Name: "govmm_epoch_pause_seconds", Help: "Time the vCPUs were stopped per checkpoint.\nSee DESIGN.md.", Type: "summary", Labels: map[string]string{"quantile": "0.99"}, Value: 0.015},
	// Interleaved and out of order on purpose: the encoder gathers a
	// family and sorts it (vcpu 2 before 10, as numbers).
	{Name: "govmm_vcpu_exits_total", Type: "counter", Labels: map[string]string{"vcpu": "2", "reason": "io"}, Value: 7},
	{Name: "govmm_epoch_pause_seconds_count", Type: "summary", Value: 600},
	{Name: "govmm_epoch_pause_seconds", Type: "summary", Labels: map[string]string{"quantile": "0.5"}, Value: 0.0021},
	{Name: "govmm_epoch_pause_seconds_sum", Type: "summary", Value: 1.5},
	{Name: "govmm_ack_seconds_sum", Help: "Resume to ack.", Type: "histogram", Value: 0.25},
	{Name: "govmm_ack_seconds_bucket", Type: "histogram", Labels: map[string]string{"le": "+Inf"}, Value: 40},
	{Name: "govmm_ack_seconds_bucket", Type: "histogram", Labels: map[string]string{"le": "0.01"}, Value: 39},
	{Name: "govmm_ack_seconds_count", Type: "histogram", Value: 40},
	{Name: "govmm_ack_seconds_bucket", Type: "histogram", Labels: map[string]string{"le": "0.0025"}, Value: 30},
	{Name: "govmm_guest_memory_bytes", Help: `Guest RAM; back\slash.`, Type: "gauge", Value: 268435456},
	{Name: "govmm_replication_peer_info", Labels: map[string]string{"peer": "a\"b\\c\nd"}, Value: 1},
	{Name: "govmm_dirty_rate", Type: "gauge", Labels: map[string]string{"kind": "nan"}, Value: math.NaN()},
	{Name: "govmm_dirty_rate", Type: "gauge", Labels: map[string]string{"kind": "inf"}, Value: math.Inf(1)},
	{Name: "govmm_dirty_rate", Type: "gauge", Labels: map[string]string{"kind": "-inf"}, Value: math.Inf(-1)},
}}

const promGolden = `# HELP govmm_ack_seconds Resume to ack.
# TYPE govmm_ack_seconds histogram
govmm_ack_seconds_bucket{le="0.0025"} 30
govmm_ack_seconds_bucket{le="0.01"} 39
govmm_ack_seconds_bucket{le="+Inf"} 40
govmm_ack_seconds_sum 0.25
govmm_ack_seconds_count 40
# TYPE govmm_dirty_rate gauge
govmm_dirty_rate{kind="-inf"} -Inf
govmm_dirty_rate{kind="inf"} +Inf
govmm_dirty_rate{kind="nan"} NaN
# HELP govmm_epoch_pause_seconds Time the vCPUs were stopped per checkpoint.\nSee DESIGN.md.
# TYPE govmm_epoch_pause_seconds summary
govmm_epoch_pause_seconds{quantile="0.5"} 0.0021
govmm_epoch_pause_seconds{quantile="0.99"} 0.015
govmm_epoch_pause_seconds_sum 1.5
govmm_epoch_pause_seconds_count 600
# HELP govmm_guest_memory_bytes Guest RAM; back\\slash.
# TYPE govmm_guest_memory_bytes gauge
govmm_guest_memory_bytes 2.68435456e+08
# TYPE govmm_replication_peer_info untyped
govmm_replication_peer_info{peer="a\"b\\c\nd"} 1
# HELP govmm_vcpu_exits_total KVM_RUN exits by reason.
# TYPE govmm_vcpu_exits_total counter
govmm_vcpu_exits_total{reason="io",vcpu="2"} 7
govmm_vcpu_exits_total{reason="io",vcpu="10"} 1234
`

func TestEncodePrometheusGolden(t *testing.T) {
	t.Parallel()
	b, err := EncodePrometheus(promStats)
	require.NoError(t, err)
	assert.Equal(t, promGolden, string(b))
}

// TestEncodePrometheusParsesBack reads the text with a small parser of the
// format and gets every sample back, escapes undone.
func TestEncodePrometheusParsesBack(t *testing.T) {
	t.Parallel()
	b, err := EncodePrometheus(promStats)
	require.NoError(t, err)
	got, err := parseProm(string(b))
	require.NoError(t, err)
	require.Len(t, got, len(promStats.Metrics))
	want := map[string]Metric{}
	for _, m := range promStats.Metrics {
		want[sampleKey(m)] = m
	}
	for _, g := range got {
		w, ok := want[sampleKey(g)]
		require.True(t, ok, "unexpected sample %s", sampleKey(g))
		if math.IsNaN(w.Value) {
			assert.True(t, math.IsNaN(g.Value))
		} else {
			assert.Equal(t, w.Value, g.Value, sampleKey(g))
		}
		assert.Equal(t, w.Labels, g.Labels)
	}
	assert.Equal(t, "a\"b\\c\nd", got[len(got)-3].Labels["peer"])
}

// The Prometheus project's own parser reads the page (promcheck adds the
// checks it leaves out: order, histograms' buckets), whatever order the
// backend's samples come in.
func TestEncodePrometheusExpfmt(t *testing.T) {
	t.Parallel()
	b, err := EncodePrometheus(promStats)
	require.NoError(t, err)
	fams, err := promcheck.Parse(string(b))
	require.NoError(t, err, "%s", b)
	h := fams["govmm_ack_seconds"].GetMetric()[0].GetHistogram()
	assert.Equal(t, uint64(40), h.GetSampleCount())
	assert.Equal(t, 0.25, h.GetSampleSum())
	require.Len(t, h.GetBucket(), 3)
	assert.Equal(t, 0.0025, h.GetBucket()[0].GetUpperBound())
	assert.Len(t, fams["govmm_vcpu_exits_total"].GetMetric(), 2)

	// The same samples in reverse give the same page.
	rev := slices.Clone(promStats.Metrics)
	slices.Reverse(rev)
	b2, err := EncodePrometheus(Stats{Metrics: rev})
	require.NoError(t, err)
	assert.Equal(t, string(b), string(b2))
}

func sampleKey(m Metric) string {
	b, _ := json.Marshal(m.Labels) // map keys sorted
	return m.Name + string(b)
}

// parseProm is a minimal parser of the text format 0.0.4, strict enough to
// catch bad escaping: samples must follow a TYPE line of their family.
func parseProm(text string) ([]Metric, error) {
	var out []Metric
	typed := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, _, _ := strings.Cut(rest, " ")
			typed[name] = true
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		m := Metric{}
		i := strings.IndexAny(line, "{ ")
		if i < 0 {
			return nil, fmt.Errorf("line %d: no value", n)
		}
		m.Name, line = line[:i], line[i:]
		if line[0] == '{' {
			m.Labels = map[string]string{}
			line = line[1:]
			for line[0] != '}' {
				k, rest, ok := strings.Cut(line, `="`)
				if !ok {
					return nil, fmt.Errorf("line %d: bad label", n)
				}
				var v strings.Builder
				j := 0
				for ; j < len(rest) && rest[j] != '"'; j++ {
					if rest[j] == '\\' {
						j++
						switch rest[j] {
						case 'n':
							v.WriteByte('\n')
						case '\\', '"':
							v.WriteByte(rest[j])
						default:
							return nil, fmt.Errorf("line %d: bad escape", n)
						}
						continue
					}
					v.WriteByte(rest[j])
				}
				m.Labels[k] = v.String()
				line = strings.TrimPrefix(rest[j+1:], ",")
			}
			line = line[1:]
		}
		v, err := strconv.ParseFloat(strings.TrimPrefix(line, " "), 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		m.Value = v
		fam := m.Name
		for _, s := range []string{"_sum", "_count", "_bucket"} {
			if base, ok := strings.CutSuffix(fam, s); ok && typed[base] {
				fam = base
			}
		}
		if !typed[fam] {
			return nil, fmt.Errorf("line %d: sample of %s before its TYPE", n, m.Name)
		}
		out = append(out, m)
	}
	return out, sc.Err()
}

func TestEncodePrometheusRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		metrics []Metric
		wantErr string
	}{
		{"empty name", []Metric{{Name: ""}}, "invalid name"},
		{"name with dash", []Metric{{Name: "govmm-exits"}}, "invalid name"},
		{"name starts with digit", []Metric{{Name: "1x"}}, "invalid name"},
		{"bad label name", []Metric{{Name: "x", Labels: map[string]string{"a-b": "1"}}}, `invalid label name "a-b"`},
		{"reserved label name", []Metric{{Name: "x", Labels: map[string]string{"__name__": "1"}}}, "invalid label name"},
		{"unknown type", []Metric{{Name: "x", Type: "meter"}}, `unknown type "meter"`},
		{"types disagree", []Metric{{Name: "x", Type: "counter"}, {Name: "x", Type: "gauge"}}, "its family \"x\" is counter"},
		{"help texts disagree", []Metric{{Name: "x", Help: "a"}, {Name: "x", Help: "b"}}, "two help texts"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := EncodePrometheus(Stats{Metrics: tt.metrics})
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}

func TestMetricsEndpoint(t *testing.T) {
	t.Parallel()
	s, c := serve(t, &fakeBackend{stats: promStats})
	resp, body := rawDo(t, s.Path(), "GET", "/metrics", nil)
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, PrometheusContentType, resp.Header.Get("Content-Type"))
	assert.Equal(t, promGolden, string(body))

	// /stats carries the same values, non-finite ones included, in the
	// same order.
	st, err := c.Stats(t.Context())
	require.NoError(t, err)
	require.Len(t, st.Metrics, len(promStats.Metrics))
	sorted := SortMetrics(promStats.Metrics)
	for i, m := range st.Metrics {
		w := sorted[i]
		assert.Equal(t, w.Name, m.Name)
		assert.Equal(t, w.Labels, m.Labels)
		assert.Equal(t, formatValue(w.Value), formatValue(m.Value))
	}

	// A backend whose metrics cannot be encoded gets a 500 that says why.
	s2, _ := serve(t, &fakeBackend{stats: Stats{Metrics: []Metric{{Name: "bad name"}}}})
	resp, body = rawDo(t, s2.Path(), "GET", "/metrics", nil)
	assert.Equal(t, 500, resp.StatusCode)
	assert.JSONEq(t, `{"error": "metrics: metric \"bad name\": invalid name"}`, string(body))
}

func TestMetricJSON(t *testing.T) {
	t.Parallel()
	b, err := json.Marshal(Stats{Metrics: []Metric{
		{Name: "a", Value: 1.5},
		{Name: "b", Type: "gauge", Labels: map[string]string{"k": "v"}, Value: math.Inf(-1)},
	}})
	require.NoError(t, err)
	assert.JSONEq(t, `{"metrics":[{"name":"a","value":1.5},{"name":"b","type":"gauge","labels":{"k":"v"},"value":"-Inf"}]}`, string(b))
	var st Stats
	require.NoError(t, json.Unmarshal(b, &st))
	assert.True(t, math.IsInf(st.Metrics[1].Value, -1))
	require.Error(t, json.Unmarshal([]byte(`{"name":"a","value":true}`), &Metric{}))
	require.Error(t, json.Unmarshal([]byte(`{"name":"a","value":"lots"}`), &Metric{}))
}
