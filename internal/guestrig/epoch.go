package guestrig

import (
	"fmt"
	"os"
	"time"

	"govmm/lab"
)

// LabEpoch is the checkpoint interval the real-guest tests replicate with
// in the lab. There every checkpoint of the default guest costs some
// 60 ms of L1's one emulated CPU the test runs on (measured: ~37 ms in
// the primary's checkpoint and stream threads, ~27 ms in the standby's,
// at ~100 dirty pages), more than the default 25 ms epoch: the guest got
// the leftovers and booted in minutes instead of seconds (not to its
// init in 150 s at 25 ms, 47-89 s at 100 ms, 29 s at 400 ms; 5-9 s
// unreplicated, in the same L1s). At 200 ms checkpoints take about a
// third of that CPU and the guest boots in well under a minute; the
// tests still take hundreds of checkpoints.
const LabEpoch = 200 * time.Millisecond

// Epoch is the --epoch the real-guest tests replicate with:
// GOVMM_TEST_EPOCH when set (a Go duration; anything else panics rather
// than run the tests at an epoch nobody asked for), else LabEpoch in the
// lab, else 0: the default.
func Epoch() time.Duration {
	if v := os.Getenv("GOVMM_TEST_EPOCH"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			panic(fmt.Sprintf("GOVMM_TEST_EPOCH=%q: want a positive Go duration such as 200ms", v))
		}
		return d
	}
	if lab.InLab() {
		return LabEpoch
	}
	return 0
}

// EpochArgs are the flags that give a govmm run or ctl replicate Epoch:
// none for the default.
func EpochArgs() []string {
	if d := Epoch(); d != 0 {
		return []string{"--epoch", d.String()}
	}
	return nil
}
