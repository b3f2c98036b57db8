package ctlapi

import (
	"bytes"
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
// label names sorted and label values and help text escaped. Families keep
// the order in which their first sample appears, and samples of one family
// are gathered even if s interleaves them. It refuses invalid names and
// families whose samples disagree on Help or Type, because a scraper would
// reject the whole page.
func EncodePrometheus(s Stats) ([]byte, error) {
	var fams []*family
	byName := map[string]*family{}
	for _, m := range s.Metrics {
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
