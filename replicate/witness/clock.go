package witness

import (
	"time"

	"golang.org/x/sys/unix"
)

// Clock is the time source of leases: the witness's expiries, the
// holder's validity and the waits between requests. Tests drive a fake
// one; nothing in this package reads the wall clock for a lease.
type Clock interface {
	// Now is a monotonic reading, in nanoseconds since an arbitrary
	// origin, that keeps counting while the host is suspended.
	Now() time.Duration
	// NewTimer fires once, d from now.
	NewTimer(d time.Duration) Timer
}

// Timer is the part of *time.Timer this package uses.
type Timer interface {
	C() <-chan time.Time
	Stop() bool
}

// BootClock reads CLOCK_BOOTTIME. Go's own monotonic clock
// (CLOCK_MONOTONIC) stops while the host is suspended: a primary resumed
// from a suspend would believe that a lease which ran out at the witness
// long ago is still valid. CLOCK_BOOTTIME counts the suspended time, so
// the lease is over when the host wakes. Its rate follows NTP's slewing
// (at most 500 ppm), which MaxDrift covers. One reading is a system call
// (about 0.25 µs here), cheap enough for the release path.
type BootClock struct{}

// Now implements Clock.
func (BootClock) Now() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		// Linux has had CLOCK_BOOTTIME since 2.6.39; nothing here runs
		// without it.
		panic("witness: clock_gettime(CLOCK_BOOTTIME): " + err.Error())
	}
	return time.Duration(ts.Nano())
}

// NewTimer implements Clock. The timer runs on Go's monotonic clock: it
// only says when to send the next request, never whether a lease holds.
func (BootClock) NewTimer(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }

type realTimer struct{ t *time.Timer }

func (t realTimer) C() <-chan time.Time { return t.t.C }
func (t realTimer) Stop() bool          { return t.t.Stop() }

// sleep waits d on clk, or until done is closed (false).
func sleep(clk Clock, d time.Duration, done <-chan struct{}) bool {
	if d <= 0 {
		select {
		case <-done:
			return false
		default:
			return true
		}
	}
	t := clk.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return true
	case <-done:
		return false
	}
}
