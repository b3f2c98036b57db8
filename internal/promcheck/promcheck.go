// Package promcheck is test support: it reads a page of the Prometheus
// text exposition format 0.0.4 with the Prometheus project's own parser
// (github.com/prometheus/common/expfmt) and then checks what that parser
// lets pass and a scraper or a query would trip on. Tests of /metrics use
// it; the govmm binary never links it.
package promcheck

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Parse parses text strictly (legacy metric and label names, as the 0.0.4
// format has them) and checks it. Beyond expfmt's own checks (syntax,
// escapes, one HELP and TYPE per family, a family's samples together):
//
//   - families appear sorted by name, and no two samples are the same
//     series;
//   - no gauge, counter or untyped sample carries a "quantile" or "le"
//     label (a distribution must be a summary or a histogram);
//   - every histogram has buckets in increasing le, cumulative counts that
//     never decrease, a +Inf bucket equal to its _count, and a _sum;
//   - every summary has a _count and a _sum.
//
// It returns the families by name.
func Parse(text string) (map[string]*dto.MetricFamily, error) {
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("expfmt: %w", err)
	}
	if err := checkOrder(text); err != nil {
		return nil, err
	}
	for name, f := range fams {
		if err := checkFamily(name, f); err != nil {
			return nil, err
		}
	}
	return fams, nil
}

// checkOrder checks that TYPE lines come in sorted order and that no
// sample line (name and labels) repeats.
func checkOrder(text string) error {
	var last string
	seen := map[string]bool{}
	for i, line := range strings.Split(text, "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, _, _ := strings.Cut(rest, " ")
			if name < last {
				return fmt.Errorf("line %d: family %s after %s: not sorted", i+1, name, last)
			}
			last = name
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		j := strings.LastIndexByte(line, ' ')
		series := line[:j]
		if seen[series] {
			return fmt.Errorf("line %d: series %s twice", i+1, series)
		}
		seen[series] = true
	}
	return nil
}

func checkFamily(name string, f *dto.MetricFamily) error {
	for _, m := range f.GetMetric() {
		switch f.GetType() {
		case dto.MetricType_GAUGE, dto.MetricType_COUNTER, dto.MetricType_UNTYPED:
			for _, l := range m.GetLabel() {
				if l.GetName() == "quantile" || l.GetName() == "le" {
					return fmt.Errorf("%s: a %s with label %s: a distribution must be a summary or a histogram",
						name, strings.ToLower(f.GetType().String()), l.GetName())
				}
			}
		case dto.MetricType_HISTOGRAM:
			h := m.GetHistogram()
			if h.SampleSum == nil || h.SampleCount == nil {
				return fmt.Errorf("%s: histogram without _sum or _count", name)
			}
			bs := h.GetBucket()
			if len(bs) == 0 {
				return fmt.Errorf("%s: histogram without buckets", name)
			}
			// expfmt keeps the buckets in the order the page lists them.
			if !slices.IsSortedFunc(bs, func(a, b *dto.Bucket) int {
				return cmpFloat(a.GetUpperBound(), b.GetUpperBound())
			}) {
				return fmt.Errorf("%s: buckets not in increasing le", name)
			}
			for i := 1; i < len(bs); i++ {
				if bs[i].GetCumulativeCount() < bs[i-1].GetCumulativeCount() {
					return fmt.Errorf("%s: bucket le=%s counts %d, below le=%s's %d", name,
						le(bs[i]), bs[i].GetCumulativeCount(), le(bs[i-1]), bs[i-1].GetCumulativeCount())
				}
			}
			top := bs[len(bs)-1]
			if !math.IsInf(top.GetUpperBound(), 1) {
				return fmt.Errorf("%s: no +Inf bucket", name)
			}
			if top.GetCumulativeCount() != h.GetSampleCount() {
				return fmt.Errorf("%s: +Inf bucket %d, _count %d", name, top.GetCumulativeCount(), h.GetSampleCount())
			}
		case dto.MetricType_SUMMARY:
			s := m.GetSummary()
			if s.SampleSum == nil || s.SampleCount == nil {
				return fmt.Errorf("%s: summary without _sum or _count", name)
			}
		}
	}
	return nil
}

func le(b *dto.Bucket) string { return strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64) }

func cmpFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
