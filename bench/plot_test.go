package bench

import (
	"image/color"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Charts that put little on a log axis (one point, one value, values
// that are not positive) still draw, PNG and SVG both; a chart with
// nothing to draw is an error, not an empty file.
func TestPlotsOnLogAxes(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	exists := func(name string) {
		t.Helper()
		for _, ext := range []string{".png", ".svg"} {
			st, err := os.Stat(filepath.Join(dir, name+ext))
			if assert.NoError(t, err, name+ext) {
				assert.Positive(t, st.Size(), name+ext)
			}
		}
	}
	require.NoError(t, lineChart(filepath.Join(dir, "one.png"), "one point", "x", "y", LogLog,
		[]Series{{Name: "a", X: []float64{3}, Y: []float64{7}, Line: true}}))
	exists("one")
	require.NoError(t, lineChart(filepath.Join(dir, "bars.png"), "error bars", "x", "y", Axes{LogX: true},
		[]Series{{Name: "a", X: []float64{10, 100}, Y: []float64{0.9, 1}, Lo: []float64{0.8, 0.95}, Hi: []float64{1, 1.1}, Line: true},
			{Name: "goal", X: []float64{10, 100}, Y: []float64{1.3, 1.3}, Line: true, Dashed: true, Color: color.Black}}))
	exists("bars")
	require.NoError(t, boxes(filepath.Join(dir, "flat.png"), "one value", "ms", true, []string{"a", "b"},
		[][]float64{{5, 5, 5}, {0, -1}}))
	exists("flat")
	require.NoError(t, boxes(filepath.Join(dir, "auto.png"), "decades apart", "ms", false, []string{"fast", "slow"},
		[][]float64{{7, 8, 9}, {500, 510, 520}}))
	exists("auto")
	require.Error(t, lineChart(filepath.Join(dir, "none.png"), "nothing", "x", "y", LogLog,
		[]Series{{Name: "a", X: []float64{0, -1}, Y: []float64{1, 2}}}))
	assert.NoFileExists(t, filepath.Join(dir, "none.png"))
	assert.True(t, spansDecade([][]float64{{7}, {500}}))
	assert.False(t, spansDecade([][]float64{{70, 0, -5}, {500}}))
}
