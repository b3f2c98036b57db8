package replicate

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestNextEpoch(t *testing.T) {
	const ms = time.Millisecond
	tests := []struct {
		name        string
		cur, lo, hi time.Duration
		load        epochLoad
		want        time.Duration
	}{
		{"fixed epochs ignore load", 25 * ms, 25 * ms, 0, epochLoad{Pause: 20 * ms, Behind: true}, 25 * ms},
		{"idle stays at the floor", 10 * ms, 10 * ms, 80 * ms, epochLoad{Pause: 300 * time.Microsecond, Ack: ms}, 10 * ms},
		{"long pause doubles", 10 * ms, 10 * ms, 80 * ms, epochLoad{Pause: 2 * ms, Ack: ms}, 20 * ms},
		{"slow ack doubles", 20 * ms, 10 * ms, 80 * ms, epochLoad{Pause: ms, Ack: 15 * ms}, 40 * ms},
		{"unacked pile doubles", 10 * ms, 10 * ms, 80 * ms, epochLoad{Behind: true}, 20 * ms},
		{"never above the cap", 60 * ms, 10 * ms, 80 * ms, epochLoad{Behind: true}, 80 * ms},
		{"at the cap stays", 80 * ms, 10 * ms, 80 * ms, epochLoad{Ack: 70 * ms}, 80 * ms},
		{"light load halves", 80 * ms, 10 * ms, 80 * ms, epochLoad{Pause: 300 * time.Microsecond, Ack: ms}, 40 * ms},
		{"never below the floor", 15 * ms, 10 * ms, 80 * ms, epochLoad{Pause: 100 * time.Microsecond, Ack: 100 * time.Microsecond}, 10 * ms},
		{"between the marks holds", 40 * ms, 10 * ms, 80 * ms, epochLoad{Pause: 2 * ms, Ack: 10 * ms}, 40 * ms},
		{"out of range is clamped first", 200 * ms, 10 * ms, 80 * ms, epochLoad{Ack: 60 * ms}, 80 * ms},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, nextEpoch(tt.cur, tt.lo, tt.hi, tt.load))
		})
	}
}

// At a steady load the length settles: one step up from where it fits
// never brings it back down, and back again (no flapping).
func TestNextEpochSettles(t *testing.T) {
	const ms = time.Millisecond
	lo, hi := 10*ms, 160*ms
	for _, l := range []epochLoad{
		{Pause: 300 * time.Microsecond, Ack: ms},
		{Pause: 3 * ms, Ack: 12 * ms},
		{Pause: 6 * ms, Ack: 30 * ms},
	} {
		cur := lo
		var seen []time.Duration
		for i := 0; i < 20; i++ {
			cur = nextEpoch(cur, lo, hi, l)
			seen = append(seen, cur)
		}
		for i := 10; i < len(seen); i++ {
			assert.Equal(t, seen[9], seen[i], "load %+v: %v", l, seen)
		}
	}
}
