package vmm

import (
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// pauseSpin: polling only where the host has a CPU for the VMM beside
// every vCPU, and GOVMM_PAUSE_SPIN overriding it.
func TestPauseSpin(t *testing.T) {
	t.Setenv("GOVMM_PAUSE_SPIN", "")
	require.Zero(t, pauseSpin(runtime.NumCPU()))
	if runtime.NumCPU() > 1 {
		require.Equal(t, defaultPauseSpin, pauseSpin(runtime.NumCPU()-1))
	}
	t.Setenv("GOVMM_PAUSE_SPIN", "0")
	require.Zero(t, pauseSpin(1))
	t.Setenv("GOVMM_PAUSE_SPIN", "1ms")
	require.Equal(t, time.Millisecond, pauseSpin(64))
	t.Setenv("GOVMM_PAUSE_SPIN", "-1ms")
	require.Zero(t, pauseSpin(1))
	t.Setenv("GOVMM_PAUSE_SPIN", "fast")
	require.Equal(t, pauseSpin(runtime.NumCPU()), time.Duration(0), "ignored: the CPU count decides")
}

// A poll gives way: a thread that shares the polling thread's CPU (here a
// busy one, both pinned to one CPU) gets nearly all of it while the poll
// lasts, instead of the half a fair share would give it. Otherwise a
// thread a cut waits for (a vCPU, the copy-on-write fault handler, the
// other side of the cut), woken on a polling thread's CPU, waits for the
// poller's time slice: on this host that made one checkpoint in ten of a
// copy-on-write guest stop for ~2.2 ms instead of 0.2.
func TestPollRecvGivesWayOnItsCPU(t *testing.T) {
	var all unix.CPUSet
	require.NoError(t, unix.SchedGetaffinity(0, &all))
	cpu := 0
	for !all.IsSet(cpu) {
		cpu++
	}
	pin := func() error {
		// The thread stays locked to its goroutine until that ends, and
		// then exits: no pinned thread goes back to the runtime.
		runtime.LockOSThread()
		var one unix.CPUSet
		one.Set(cpu)
		return unix.SchedSetaffinity(0, &one)
	}
	stop := make(chan struct{})
	helper := make(chan int32)
	go func() {
		if err := pin(); err != nil {
			helper <- 0
			return
		}
		helper <- int32(unix.Gettid())
		for {
			select {
			case <-stop:
				return
			default:
			}
		}
	}()
	defer close(stop)
	htid := <-helper
	require.NotZero(t, htid, "pin the busy thread")
	require.NoError(t, pin())
	ptid := int32(unix.Gettid())

	done := make(chan struct{})
	time.AfterFunc(300*time.Millisecond, func() { close(done) })
	h0, p0 := threadCPU(t, htid), threadCPU(t, ptid)
	_, ok := pollRecv(make(chan int), done, time.Second) // nothing comes: it polls until done
	h, p := threadCPU(t, htid)-h0, threadCPU(t, ptid)-p0
	require.False(t, ok)
	t.Logf("over the poll, on CPU %d: the busy thread ran %v, the polling one %v", cpu, h, p)
	require.Less(t, p, h/4, "the polling thread kept its share of the CPU")
}
