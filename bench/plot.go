package bench

import (
	"encoding/csv"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// Series is one named set of points on a plot.
type Series struct {
	Name   string
	X, Y   []float64
	Line   bool // join the points (sorted by X) instead of scattering them
	Dashed bool
	// Lo and Hi, when set (one per point), are the ends of an error bar
	// drawn at each point: the spread of the trials behind a median.
	Lo, Hi []float64
	// Color, when set, replaces the series' color from the palette (which
	// repeats after seven): for series that belong together, or a
	// reference line that must not look like one of them.
	Color color.Color
}

// Axes says which axes of a chart are logarithmic. Use a log axis
// wherever the values span decades: on a linear one the small cases
// flatten into the axis.
type Axes struct{ LogX, LogY bool }

// LogLog is both axes logarithmic.
var LogLog = Axes{LogX: true, LogY: true}

// lineChart draws series on one plot and saves it as a PNG and an SVG
// (savePlot). Points that cannot be drawn on a log axis (zero or
// negative) are left out.
func lineChart(path, title, xlabel, ylabel string, axes Axes, series []Series) error {
	p := newChart(title, xlabel, ylabel, axes)
	drawn := 0
	for i, s := range series {
		xys, errs := chartPoints(s, axes)
		if len(xys) == 0 {
			continue
		}
		if err := addSeries(p, i, s, xys, errs); err != nil {
			return err
		}
		drawn++
	}
	if drawn == 0 {
		return fmt.Errorf("plot %s: no points to draw", filepath.Base(path))
	}
	fitAxes(p, axes)
	return savePlot(p, 7*vg.Inch, 5*vg.Inch, path)
}

// newChart is an empty plot with its titles, grid, legend top-left and
// the axes' scales.
func newChart(title, xlabel, ylabel string, axes Axes) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xlabel
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	if axes.LogX {
		p.X.Scale, p.X.Tick.Marker = plot.LogScale{}, logTicks{}
	}
	if axes.LogY {
		p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, logTicks{}
	}
	return p
}

// chartPoints are the points of s that axes can draw, and their error
// bars when s has them (nil otherwise); a bar that a log axis cannot
// draw shrinks to its point.
func chartPoints(s Series, axes Axes) (plotter.XYs, plotter.YErrors) {
	var xys plotter.XYs
	var errs plotter.YErrors
	for j := range s.X {
		x, y := s.X[j], s.Y[j]
		if math.IsNaN(x) || math.IsNaN(y) || (axes.LogX && x <= 0) || (axes.LogY && y <= 0) {
			continue
		}
		xys = append(xys, plotter.XY{X: x, Y: y})
		if s.Lo != nil {
			lo, hi := s.Lo[j], s.Hi[j]
			if math.IsNaN(lo) || math.IsNaN(hi) || (axes.LogY && lo <= 0) {
				lo, hi = y, y
			}
			errs = append(errs, struct{ Low, High float64 }{y - lo, hi - y})
		}
	}
	return xys, errs
}

// addSeries draws series number i: its error bars, then a line through
// its points (sorted by x) or a scatter, in the i-th color and shape,
// with its legend entry.
func addSeries(p *plot.Plot, i int, s Series, xys plotter.XYs, errs plotter.YErrors) error {
	c := plotutil.Color(i)
	if s.Color != nil {
		c = s.Color
	}
	if errs != nil {
		eb, err := plotter.NewYErrorBars(errPoints{xys, errs})
		if err != nil {
			return err
		}
		eb.Color = c
		p.Add(eb)
	}
	if !s.Line {
		sc, err := plotter.NewScatter(xys)
		if err != nil {
			return err
		}
		sc.Color = withAlpha(c, 0x80)
		sc.Shape = plotutil.Shape(i)
		sc.Radius = vg.Points(2)
		p.Add(sc)
		p.Legend.Add(s.Name, sc)
		return nil
	}
	sortXYs(xys)
	l, pts, err := plotter.NewLinePoints(xys)
	if err != nil {
		return err
	}
	l.Color, pts.Color = c, c
	l.Width = vg.Points(1.5)
	pts.Shape = plotutil.Shape(i)
	if s.Dashed {
		l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
	}
	p.Add(l, pts)
	p.Legend.Add(s.Name, l, pts)
	return nil
}

// fitAxes widens the axes the data set: a log axis over a single value by
// a factor (gonum would pad it by ±1, maybe below zero), and the y axis
// with headroom above the data for the legend, which sits top-left.
func fitAxes(p *plot.Plot, axes Axes) {
	if axes.LogX && p.X.Min == p.X.Max {
		p.X.Min, p.X.Max = p.X.Min/2, p.X.Max*2
	}
	if axes.LogY && p.Y.Min == p.Y.Max {
		p.Y.Min, p.Y.Max = p.Y.Min/2, p.Y.Max*2
	}
	if axes.LogY {
		p.Y.Max *= math.Pow(p.Y.Max/p.Y.Min, 0.4) // a factor on a log axis
	} else {
		p.Y.Max += (p.Y.Max - p.Y.Min) * 0.4
	}
}

// errPoints are points with their error bars, for plotter.NewYErrorBars.
type errPoints struct {
	plotter.XYs
	plotter.YErrors
}

// savePlot saves p as the PNG path and as an SVG beside it (the same name
// ending in .svg), which scales without blur in a browser or a paper.
func savePlot(p *plot.Plot, w, h vg.Length, path string) error {
	if err := p.Save(w, h, path); err != nil {
		return err
	}
	return p.Save(w, h, strings.TrimSuffix(path, filepath.Ext(path))+".svg")
}

// boxes draws one box plot (median, quartiles, whiskers, outliers) per
// group and saves it as a PNG and an SVG. The value axis is logarithmic
// (values that are not positive left out, the label saying so) when logY
// is set or the values span a decade or more: on a linear axis the small
// groups flatten into it.
func boxes(path, title, ylabel string, logY bool, groups []string, values [][]float64) error {
	logY = logY || spansDecade(values)
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Add(plotter.NewGrid())
	if logY {
		p.Y.Scale, p.Y.Tick.Marker = plot.LogScale{}, logTicks{}
		p.Y.Label.Text += ", log scale"
	}
	for i, vs := range values {
		if logY {
			vs = slices.DeleteFunc(slices.Clone(vs), func(v float64) bool { return v <= 0 || math.IsNaN(v) })
		}
		if len(vs) == 0 {
			continue
		}
		b, err := plotter.NewBoxPlot(vg.Points(24), float64(i), plotter.Values(vs))
		if err != nil {
			return err
		}
		b.FillColor = withAlpha(plotutil.Color(i%2), 0x60)
		b.GlyphStyle.Shape = draw.CircleGlyph{}
		p.Add(b)
	}
	if logY {
		// Room above and below the boxes: a factor on a log axis.
		p.Y.Max, p.Y.Min = p.Y.Max*1.25, p.Y.Min/1.25
	}
	p.NominalX(groups...)
	// Half a slot either side, so the first and last boxes are not cut by
	// the plot's edges.
	p.X.Min, p.X.Max = -0.5, float64(len(groups))-0.5
	p.X.Tick.Label.Rotation = 0.4
	p.X.Tick.Label.XAlign = draw.XRight
	return savePlot(p, 8*vg.Inch, 5*vg.Inch, path)
}

// spansDecade reports whether the positive values reach ten times the
// smallest.
func spansDecade(values [][]float64) bool {
	lo, hi := math.Inf(1), 0.0
	for _, vs := range values {
		for _, v := range vs {
			if v > 0 {
				lo, hi = min(lo, v), max(hi, v)
			}
		}
	}
	return hi >= 10*lo
}

// logTicks marks every digit of each decade on a log axis and labels 1, 2
// and 5 of it (only 1, the powers of ten, over more than three decades):
// gonum's LogTicks labels powers of ten alone, which leaves a range of a
// decade or two with one label or none.
type logTicks struct{}

// Ticks implements plot.Ticker.
func (logTicks) Ticks(min, max float64) []plot.Tick {
	if min <= 0 || max < min {
		return nil
	}
	wide := math.Log10(max/min) > 3
	var ts []plot.Tick
	for e := math.Floor(math.Log10(min)); e <= math.Ceil(math.Log10(max)); e++ {
		for d := 1; d <= 9; d++ {
			v := float64(d) * math.Pow(10, e)
			if v < min || v > max {
				continue
			}
			t := plot.Tick{Value: v}
			if d == 1 || (!wide && (d == 2 || d == 5)) {
				t.Label = strconv.FormatFloat(v, 'g', 4, 64)
				if v >= 0.001 && v < 1e7 {
					t.Label = strconv.FormatFloat(v, 'f', -1, 64) // 100000, not 1e+05
				}
			}
			ts = append(ts, t)
		}
	}
	return ts
}

func withAlpha(c color.Color, a uint8) color.Color {
	r, g, b, _ := c.RGBA()
	return color.NRGBA{R: uint8(r >> 8), G: uint8(g >> 8), B: uint8(b >> 8), A: a}
}

func sortXYs(xys plotter.XYs) {
	for i := 1; i < len(xys); i++ {
		for j := i; j > 0 && xys[j].X < xys[j-1].X; j-- {
			xys[j], xys[j-1] = xys[j-1], xys[j]
		}
	}
}

// writeCSV writes a header and rows to path.
func writeCSV(path string, header []string, rows [][]string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := csv.NewWriter(f)
	_ = w.Write(header)
	_ = w.WriteAll(rows)
	if err := w.Error(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func ftoa(v float64, prec int) string {
	if math.IsNaN(v) {
		return ""
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// usOf is d in microseconds, keeping the fraction.
func usOf(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// msOf is d in milliseconds, keeping the fraction.
func msOf(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
