package vmm

import (
	"os"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

func newCounterMachine(tb testing.TB, cpus int) *Machine {
	tb.Helper()
	m, err := New(Config{MemSize: 64 << 20, CPUs: cpus, Kernel: tinyguest.Kernel(tinyguest.Counter(counterGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: &syncBuffer{}})
	require.NoError(tb, err)
	return m
}

// A machine holds one P more per vCPU while it lives, and gives them back
// on Close (procs.go); machines add up.
func TestMachineHoldsAPPerVCPU(t *testing.T) {
	kvmtest.Require(t)
	if os.Getenv("GOMAXPROCS") != "" {
		t.Skip("GOMAXPROCS is set in the environment: left alone by design")
	}
	before := runtime.GOMAXPROCS(0)
	a := newCounterMachine(t, 2)
	require.Equal(t, before+2, runtime.GOMAXPROCS(0))
	b := newCounterMachine(t, 1)
	require.Equal(t, before+3, runtime.GOMAXPROCS(0))
	require.NoError(t, a.Close())
	require.NoError(t, a.Close(), "a second Close gives back nothing more")
	require.Equal(t, before+1, runtime.GOMAXPROCS(0))
	require.NoError(t, b.Close())
	require.Equal(t, before, runtime.GOMAXPROCS(0))
}

// BenchmarkPauseWithBusyGoroutines times Pause of a running 2-vCPU
// machine while as many goroutines as the host has CPUs spin in the
// process (what a busy stream sender looks like to the scheduler):
// p50/p90 per pause. Run it with GOMAXPROCS=<CPUs> in the environment to
// see the pause without the extra Ps.
func BenchmarkPauseWithBusyGoroutines(b *testing.B) {
	kvmtest.Require(b)
	m := newCounterMachine(b, 2)
	defer m.Close()
	require.NoError(b, m.Start())
	var stop atomic.Bool
	defer stop.Store(true)
	for range runtime.NumCPU() {
		go func() {
			for x := 0; !stop.Load(); x++ {
			}
		}()
	}
	d := make([]time.Duration, 0, b.N)
	for b.Loop() {
		time.Sleep(time.Millisecond) // the guest runs between pauses
		t0 := time.Now()
		require.NoError(b, m.Pause())
		d = append(d, time.Since(t0))
		require.NoError(b, m.Resume())
	}
	slices.Sort(d)
	b.ReportMetric(float64(d[len(d)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(d[len(d)*9/10].Microseconds()), "p90-µs")
}
