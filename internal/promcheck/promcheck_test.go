package promcheck

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	t.Parallel()
	good := `# TYPE a_seconds histogram
a_seconds_bucket{le="0.001"} 1
a_seconds_bucket{le="0.01"} 3
a_seconds_bucket{le="+Inf"} 4
a_seconds_sum 0.5
a_seconds_count 4
# TYPE b gauge
b{x="1"} 2
b{x="2"} 2
`
	fams, err := Parse(good)
	require.NoError(t, err)
	assert.Equal(t, uint64(4), fams["a_seconds"].GetMetric()[0].GetHistogram().GetSampleCount())

	tests := []struct{ name, text, wantErr string }{
		{"quantile gauge", "# TYPE p gauge\np{quantile=\"1\"} 3\n", "must be a summary or a histogram"},
		{"unsorted", "# TYPE b gauge\nb 1\n# TYPE a gauge\na 1\n", "not sorted"},
		{"twice", "# TYPE b gauge\nb{x=\"1\"} 1\nb{x=\"1\"} 2\n", "twice"},
		{"decreasing", "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 2\n", "below"},
		{"inf not count", "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n", "_count 3"},
		{"no inf", "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "no +Inf"},
		{"le order", "# TYPE h histogram\nh_bucket{le=\"2\"} 1\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "increasing le"},
		{"syntax", "# TYPE a gauge\na{x=1} 1\n", "expfmt"},
		{"bad name", "# TYPE a-b gauge\n", "expfmt"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse(tt.text)
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
}
