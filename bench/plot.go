package bench

import (
	"encoding/csv"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
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
}

// lineChart draws series on one plot and saves it as a PNG. With log set,
// both axes are logarithmic and points that cannot be drawn on them (zero
// or negative) are left out.
func lineChart(path, title, xlabel, ylabel string, log bool, series []Series) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xlabel
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	if log {
		p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
		p.X.Tick.Marker, p.Y.Tick.Marker = plot.LogTicks{Prec: -1}, plot.LogTicks{Prec: -1}
	}
	drawn := 0
	for i, s := range series {
		var xys plotter.XYs
		for j := range s.X {
			x, y := s.X[j], s.Y[j]
			if math.IsNaN(x) || math.IsNaN(y) || (log && (x <= 0 || y <= 0)) {
				continue
			}
			xys = append(xys, plotter.XY{X: x, Y: y})
		}
		if len(xys) == 0 {
			continue
		}
		c := plotutil.Color(i)
		if s.Line {
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
		} else {
			sc, err := plotter.NewScatter(xys)
			if err != nil {
				return err
			}
			sc.Color = withAlpha(c, 0x80)
			sc.Shape = plotutil.Shape(i)
			sc.Radius = vg.Points(2)
			p.Add(sc)
			p.Legend.Add(s.Name, sc)
		}
		drawn++
	}
	if drawn == 0 {
		return fmt.Errorf("plot %s: no points to draw", filepath.Base(path))
	}
	if !log {
		// Headroom above the data for the legend, which sits top-left.
		p.Y.Max += (p.Y.Max - p.Y.Min) * 0.4
	}
	return p.Save(7*vg.Inch, 5*vg.Inch, path)
}

// stackedBars draws one stacked bar per category (x axis), one layer per
// component, and saves it as a PNG.
func stackedBars(path, title, ylabel string, categories, layers []string, values [][]float64) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	var below *plotter.BarChart
	for i, name := range layers {
		vs := make(plotter.Values, len(categories))
		for j := range categories {
			v := values[i][j]
			if math.IsNaN(v) || v < 0 {
				v = 0
			}
			vs[j] = v
		}
		b, err := plotter.NewBarChart(vs, vg.Points(28))
		if err != nil {
			return err
		}
		b.Color = plotutil.Color(i)
		b.LineStyle.Width = 0
		if below != nil {
			b.StackOn(below)
		}
		below = b
		p.Add(b)
		p.Legend.Add(name, b)
	}
	p.NominalX(categories...)
	return p.Save(7*vg.Inch, 5*vg.Inch, path)
}

// boxes draws one box plot (median, quartiles, whiskers, outliers) per
// group and saves it as a PNG.
func boxes(path, title, ylabel string, groups []string, values [][]float64) error {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Add(plotter.NewGrid())
	for i, vs := range values {
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
	p.NominalX(groups...)
	p.X.Tick.Label.Rotation = 0.4
	p.X.Tick.Label.XAlign = draw.XRight
	return p.Save(8*vg.Inch, 5*vg.Inch, path)
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
