package ctlapi

import (
	"bytes"
	"cmp"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// PrometheusContentType is the content type of the text exposition format
// 0.0.4 that GET /metrics serves.
const PrometheusContentType = "text/plain; version=0.0.4; charset=utf-8"

// family is the samples that share one HELP and TYPE line.
type family struct {
	name, help, typ string
	samples         []Metric
}

// EncodePrometheus renders s in the Prometheus text exposition format
// 0.0.4: per family, "# HELP" and "# TYPE" lines and then its samples, with
// label names sorted and label values and help text escaped. The order is
// SortMetrics's: families by name, so two scrapes list the same series in
// the same order whatever order s has them in. It refuses invalid names
// and families whose samples disagree on Help or Type, because a scraper
// would reject the whole page.
func EncodePrometheus(s Stats) ([]byte, error) {
	var fams []*family
	byName := map[string]*family{}
	for _, m := range SortMetrics(s.Metrics) {
		if !validMetricName(m.Name) {
			return nil, fmt.Errorf("metric %q: invalid name", m.Name)
		}
		typ := m.Type
		if typ == "" {
			typ = "untyped"
		}
		switch typ {
		case "counter", "gauge", "summary", "histogram", "untyped":
		default:
			return nil, fmt.Errorf("metric %q: unknown type %q", m.Name, m.Type)
		}
		for k := range m.Labels {
			if !validLabelName(k) {
				return nil, fmt.Errorf("metric %q: invalid label name %q", m.Name, k)
			}
		}
		name := familyName(m.Name, typ)
		f := byName[name]
		if f == nil {
			f = &family{name: name, typ: typ}
			byName[name] = f
			fams = append(fams, f)
		}
		if f.typ != typ {
			return nil, fmt.Errorf("metric %q: type %s, but its family %q is %s", m.Name, typ, name, f.typ)
		}
		if m.Help != "" && f.help != "" && m.Help != f.help {
			return nil, fmt.Errorf("metric %q: two help texts", m.Name)
		}
		if m.Help != "" {
			f.help = m.Help
		}
		f.samples = append(f.samples, m)
	}

	var b bytes.Buffer
	for _, f := range fams {
		if f.help != "" {
			fmt.Fprintf(&b, "# HELP %s %s\n", f.name, escapeHelp(f.help))
		}
		fmt.Fprintf(&b, "# TYPE %s %s\n", f.name, f.typ)
		for _, m := range f.samples {
			b.WriteString(m.Name)
			if len(m.Labels) > 0 {
				keys := make([]string, 0, len(m.Labels))
				for k := range m.Labels {
					keys = append(keys, k)
				}
				slices.Sort(keys)
				b.WriteByte('{')
				for i, k := range keys {
					if i > 0 {
						b.WriteByte(',')
					}
					fmt.Fprintf(&b, "%s=\"%s\"", k, escapeLabelValue(m.Labels[k]))
				}
				b.WriteByte('}')
			}
			b.WriteByte(' ')
			b.WriteString(formatValue(m.Value))
			b.WriteByte('\n')
		}
	}
	return b.Bytes(), nil
}

// familyName strips the suffixes that summaries and histograms put on
// their _sum, _count and _bucket samples.
func familyName(name, typ string) string {
	suffixes := map[string][]string{
		"summary":   {"_sum", "_count"},
		"histogram": {"_sum", "_count", "_bucket"},
	}[typ]
	for _, s := range suffixes {
		if base, ok := strings.CutSuffix(name, s); ok && base != "" {
			return base
		}
	}
	return name
}

// SortMetrics returns a sorted copy of ms: by family name (a histogram's
// or summary's _bucket, _sum and _count samples belong to their family);
// within a family by labels, compared key by key in key order, with values
// that are numbers compared as numbers (vcpu="2" before vcpu="10"); and
// for one label set, a histogram's buckets in increasing le (+Inf last),
// then _sum, then _count, as a summary's quantiles then _sum and _count.
// The sort is stable: samples that compare equal keep their order.
func SortMetrics(ms []Metric) []Metric {
	out := slices.Clone(ms)
	slices.SortStableFunc(out, func(a, b Metric) int {
		fa, fb := familyName(a.Name, a.Type), familyName(b.Name, b.Type)
		if c := strings.Compare(fa, fb); c != 0 {
			return c
		}
		if c := compareLabels(a.Labels, b.Labels); c != 0 {
			return c
		}
		if c := cmp.Compare(suffixRank(a.Name, fa), suffixRank(b.Name, fb)); c != 0 {
			return c
		}
		for _, k := range []string{"le", "quantile"} {
			if c := compareValues(a.Labels[k], b.Labels[k]); c != 0 {
				return c
			}
		}
		return 0
	})
	return out
}

// compareLabels orders two label sets, leaving out le and quantile (the
// position of a sample within its series, which SortMetrics orders last).
func compareLabels(a, b map[string]string) int {
	keys := func(m map[string]string) []string {
		var ks []string
		for k := range m {
			if k != "le" && k != "quantile" {
				ks = append(ks, k)
			}
		}
		slices.Sort(ks)
		return ks
	}
	ka, kb := keys(a), keys(b)
	for i := range min(len(ka), len(kb)) {
		if c := strings.Compare(ka[i], kb[i]); c != 0 {
			return c
		}
		if c := compareValues(a[ka[i]], b[kb[i]]); c != 0 {
			return c
		}
	}
	return cmp.Compare(len(ka), len(kb))
}

// compareValues compares two label values: as numbers when both are
// (with digits, or le's "+Inf"), else as strings; a number sorts before a
// word.
func compareValues(a, b string) int {
	fa, na := labelNumber(a)
	fb, nb := labelNumber(b)
	switch {
	case na && nb:
		return cmp.Compare(fa, fb)
	case na:
		return -1
	case nb:
		return 1
	}
	return strings.Compare(a, b)
}

// labelNumber reads a label value that is a number. Words that ParseFloat
// would take too ("nan", "inf") stay words.
func labelNumber(s string) (float64, bool) {
	if s == "+Inf" {
		return math.Inf(1), true
	}
	if !strings.ContainsAny(s, "0123456789") {
		return 0, false
	}
	f, err := strconv.ParseFloat(s, 64)
	return f, err == nil && !math.IsNaN(f)
}

// suffixRank puts a family's own samples (and a histogram's buckets)
// before its _sum and _count.
func suffixRank(name, family string) int {
	switch strings.TrimPrefix(name, family) {
	case "_sum":
		return 1
	case "_count":
		return 2
	}
	return 0
}

// formatValue writes a sample value as the text format spells it.
func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// escapeHelp escapes a HELP text: backslash and newline.
func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}

// escapeLabelValue escapes a label value: backslash, double quote and
// newline.
func escapeLabelValue(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

func validMetricName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		ok := c == '_' || c == ':' || ('a' <= c && c <= 'z') || ('A' <= c && c <= 'Z') || (i > 0 && '0' <= c && c <= '9')
		if !ok {
			return false
		}
	}
	return true
}

// validLabelName also refuses the "__" prefix that Prometheus reserves.
func validLabelName(s string) bool {
	return validMetricName(s) && !strings.Contains(s, ":") && !strings.HasPrefix(s, "__")
}
