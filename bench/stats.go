package bench

import (
	"math"
	"sort"
)

// Summary is the distribution of one measurement.
type Summary struct {
	N                int
	Median, Min, Max float64
	P25, P75, P90    float64
	P99              float64
}

// Summarize computes order statistics (nearest-rank percentiles).
func Summarize(xs []float64) Summary {
	if len(xs) == 0 {
		return Summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN(), P25: math.NaN(), P75: math.NaN(), P90: math.NaN(), P99: math.NaN()}
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	q := func(p float64) float64 {
		if len(s) == 1 {
			return s[0]
		}
		pos := p * float64(len(s)-1)
		lo := int(math.Floor(pos))
		hi := int(math.Ceil(pos))
		return s[lo] + (s[hi]-s[lo])*(pos-float64(lo))
	}
	return Summary{N: len(s), Median: q(0.5), Min: s[0], Max: s[len(s)-1], P25: q(0.25), P75: q(0.75), P90: q(0.9), P99: q(0.99)}
}
