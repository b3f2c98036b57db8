package dirtier

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestPace(t *testing.T) {
	t.Parallel()
	const mib = 1 << 20
	tests := []struct {
		name        string
		rate        float64
		elapsed     time.Duration
		done, burst int64
		wantDue     int64
		wantSkipped int64
	}{
		{"one second at 1 MiB/s", mib, time.Second, 0, 1000, 256, 0},
		{"on schedule", mib, time.Second, 256, 1000, 0, 0},
		{"ahead of schedule", mib, time.Second, 300, 1000, 0, 0},
		{"one slice", mib, 10 * time.Millisecond, 0, 1000, 2, 0}, // 2.56 pages, rounded down
		{"stall forgiven beyond the burst", mib, 10 * time.Second, 256, 64, 64, 2560 - 256 - 64},
		{"rate zero is the caller's business", 0, time.Second, 0, 64, 0, 0},
		{"no time yet", mib, 0, 0, 64, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			due, skipped := pace(tt.rate, tt.elapsed, tt.done, tt.burst)
			assert.Equal(t, tt.wantDue, due)
			assert.Equal(t, tt.wantSkipped, skipped)
		})
	}
}

// Simulating the loop with a fake clock: slices of 5 ms for 3 s at
// 100 MiB/s dirty 300 MiB, within one slice's worth.
func TestPaceSimulated(t *testing.T) {
	t.Parallel()
	const rate = 100 << 20
	burst := burstPages(rate, slice)
	var done int64
	for el := time.Duration(0); el <= 3*time.Second; el += slice {
		due, skipped := pace(rate, el, done, burst)
		assert.Zero(t, skipped, "no stall, nothing forgiven")
		assert.LessOrEqual(t, due, burst)
		done += due
	}
	want := int64(3 * rate / pageSize)
	assert.InDelta(t, want, done, float64(rate*slice.Seconds()/pageSize)+1)
}

func TestBurstPages(t *testing.T) {
	t.Parallel()
	assert.Equal(t, int64(1), burstPages(1, slice), "at least one page")
	assert.Equal(t, int64(256), burstPages(100<<20, slice)) // 2 * 100 MiB/s * 5 ms / 4 KiB
}
