package vmm

import (
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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
