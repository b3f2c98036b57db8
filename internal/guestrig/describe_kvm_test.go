package guestrig

import (
	"context"
	"encoding/binary"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/vmm"
)

// DescribeMachine of a running tiny guest (a counter loop, interrupts
// off) gives its exit counts and its vCPU's position, and leaves it
// running; of a stopped machine, nothing.
func TestDescribeMachine(t *testing.T) {
	kvmtest.Require(t)
	const counter = 0x8000
	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 1, Kernel: tinyguest.Kernel(tinyguest.Counter(counter)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
	require.NoError(t, err)
	defer m.Close()
	require.NoError(t, m.Start())
	count := func() uint64 {
		b, err := m.Memory().Slice(counter, 8)
		require.NoError(t, err)
		return binary.LittleEndian.Uint64(b)
	}
	require.Eventually(t, func() bool { return count() > 0 }, 30*time.Second, time.Millisecond)

	d := DescribeMachine(m)
	t.Log(d)
	require.Regexp(t, `^KVM exits \[\d+\], then KVM exits \[\d+\]; vCPU 0: mp_state 0, rip 0x[0-9a-f]+, rflags 0x[0-9a-f]+ \(IF 0\), cs 0x[0-9a-f]+, LAPIC irr \[`, d)
	before := count()
	require.Eventually(t, func() bool { return count() > before }, 30*time.Second, time.Millisecond, "still running")

	// A cut that never ends (here one held open) leaves no pause to
	// take: said so, with where every goroutine is.
	defer func(d time.Duration, f func()) { describePause, describeEnded = d, f }(describePause, describeEnded)
	describePause = time.Second
	ended := make(chan struct{})
	describeEnded = func() { close(ended) }
	held, release := make(chan struct{}), make(chan struct{})
	go func() {
		_ = m.WithPaused(context.Background(), func() error { close(held); <-release; return nil })
	}()
	<-held
	d = DescribeMachine(m)
	close(release)
	<-ended // its pause, once it came, read nothing
	require.Contains(t, d, "no state: no pause within 1s; this process's goroutines:\ngoroutine ")
	require.Contains(t, d, "guestrig.TestDescribeMachine")

	m.Stop()
	_, _ = m.Wait()
	require.Empty(t, DescribeMachine(m))
}
