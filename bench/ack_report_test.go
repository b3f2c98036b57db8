package bench

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ackRound is one round of a point: a stream batch and a bound batch,
// each ack's wall time given in ms.
func ackRound(round int, stream, bound []float64) []AckSample {
	batch := func(kind string, ms []float64) AckSample {
		s := AckSample{Pages: 1000, Kind: kind, Gap: 50 * time.Millisecond, Round: round, Acks: len(ms)}
		var sum time.Duration
		for _, m := range ms {
			d := time.Duration(m * float64(time.Millisecond))
			s.Each = append(s.Each, d)
			sum += d
		}
		s.Wall = sum / time.Duration(len(ms))
		return s
	}
	return []AckSample{batch("stream", stream), batch("bound", bound)}
}

// One stall in a batch of four acks moves that batch's mean, and so the
// round's ratio of means, but not the median over every ack: the stream
// at 1.1× the bound's every ack, with a 30 ms stall in two of its three
// batches and one in the bound's third, reads 1.1× ack by ack and far
// more by the rounds' means.
func TestEachAckRatioIsNotDecidedByOneStall(t *testing.T) {
	var r AckResult
	r.Config.Gaps = []time.Duration{50 * time.Millisecond}
	r.Samples = append(r.Samples, ackRound(0, []float64{1.1, 1.1, 1.1, 30}, []float64{1, 1, 1, 1})...)
	r.Samples = append(r.Samples, ackRound(1, []float64{1.1, 30, 1.1, 1.1}, []float64{1, 1, 1, 1})...)
	r.Samples = append(r.Samples, ackRound(2, []float64{1.1, 1.1, 1.1, 1.1}, []float64{1, 1, 30, 1})...)
	ps := r.points()
	require.Len(t, ps, 1)
	p := ps[0]
	pooled, rounds := p.eachRatio(p.bound)
	assert.InDelta(t, 1.1, pooled, 1e-9)
	require.Len(t, rounds, 3)
	for _, x := range rounds {
		assert.InDelta(t, 1.1, x, 1e-9, "a round's median of four holds one stall")
	}
	assert.Greater(t, Summarize(p.wall).Median, 3.0, "the rounds' ratios of means: two of three carry the stream's stall")

	rep := r.Report()
	assert.Contains(t, rep, "| unkeyed | 1000 | 50ms | 12 | 1.10 (")
	assert.Contains(t, rep, " 1.10× (1.10–1.10) |")
	y, lo, hi, ok := eachRatioPoint(p, p.bound, nil)
	require.True(t, ok)
	assert.InDelta(t, 1.1, y, 1e-9)
	assert.InDelta(t, 1.1, lo, 1e-9)
	assert.InDelta(t, 1.1, hi, 1e-9)
	_, _, _, ok = eachRatioPoint(p, nil, nil)
	assert.False(t, ok, "no reference samples, no point")
	assert.Equal(t, 1, strings.Count(rep, "**Each ack.**"))
}
