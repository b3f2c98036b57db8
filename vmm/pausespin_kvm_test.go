package vmm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/tinyguest"
)

// threadCPU is the time thread tid has run on a CPU, from the kernel's
// schedstat.
func threadCPU(t *testing.T, tid int32) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/schedstat", tid))
	require.NoError(t, err)
	ns, err := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
	require.NoError(t, err)
	return time.Duration(ns)
}

// A paused vCPU polls for its next request for up to Machine.spin, then
// sleeps: a machine left paused costs no CPU, and each request in a
// cut's sequence (pause, save, resume) is answered either way.
func TestPausedVCPUPollsThenSleeps(t *testing.T) {
	const spin = 2 * time.Millisecond
	m, _ := startTinyWith(t, 1, tinyguest.Counter(counterGPA), func(m *Machine) { m.spin = spin })
	tid := m.vcpus[0].tid.Load()
	require.NotZero(t, tid)
	for i := 0; i < 20; i++ {
		require.NoError(t, m.Pause())
		st, err := m.EncodeState()
		require.NoError(t, err)
		require.NotEmpty(t, st)
		require.NoError(t, m.Resume())
	}
	require.NoError(t, m.Pause())
	defer m.Resume()
	time.Sleep(50 * time.Millisecond) // past the poll
	before := threadCPU(t, tid)
	const idle = 300 * time.Millisecond
	time.Sleep(idle)
	used := threadCPU(t, tid) - before
	require.Less(t, used, idle/4, "a vCPU paused for %v ran %v: it polled past its %v", idle, used, spin)
	// Asleep, it still answers.
	_, err := m.EncodeState()
	require.NoError(t, err)
}
