package dirtier

import "time"

const pageSize = 4096

// pace decides how many pages to touch now so that, on average since the
// start, rate bytes per second are dirtied. done counts pages already
// touched (or forgiven). At most maxBurst pages are due at once; a larger
// debt, left by a stall such as a checkpoint pause, is forgiven rather than
// repaid in a burst, and returned as skipped so the caller adds it to done.
func pace(rate float64, elapsed time.Duration, done, maxBurst int64) (due, skipped int64) {
	if rate <= 0 || elapsed <= 0 {
		return 0, 0
	}
	target := int64(rate * elapsed.Seconds() / pageSize)
	debt := target - done
	if debt <= 0 {
		return 0, 0
	}
	if debt > maxBurst {
		return maxBurst, debt - maxBurst
	}
	return debt, 0
}

// burstPages is the most pages one time slice may touch at rate: two
// slices' worth, at least one page.
func burstPages(rate float64, slice time.Duration) int64 {
	return max(1, int64(2*rate*slice.Seconds()/pageSize))
}
