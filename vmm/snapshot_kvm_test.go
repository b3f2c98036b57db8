package vmm

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

const counterGPA = 0x8000

func readCounter(t *testing.T, m *Machine) uint64 {
	t.Helper()
	b, err := m.Memory().Slice(counterGPA, 8)
	require.NoError(t, err)
	return binary.LittleEndian.Uint64(b)
}

// newRestoreTarget builds an empty machine of the same shape as a source.
func newRestoreTarget(t *testing.T, cpus int) *Machine {
	t.Helper()
	m, err := New(Config{MemSize: 64 << 20, CPUs: cpus, Console: &syncBuffer{}})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// A running guest is snapshotted to a file and restored into a new
// machine: its counter goes on from the value at the cut, never from zero,
// on both vCPUs' states.
func TestSnapshotRestoreContinues(t *testing.T) {
	kvmtest.Require(t)
	src, _ := startTiny(t, 2, tinyguest.Counter(counterGPA))
	require.Eventually(t, func() bool { return readCounter(t, src) > 1000 }, 30*time.Second, time.Millisecond)

	require.NoError(t, src.Pause())
	require.NoError(t, src.QuiesceDevices(context.Background()))
	st, err := src.SaveState()
	require.NoError(t, err)
	atCut := readCounter(t, src)
	path := filepath.Join(t.TempDir(), "vm.snap")
	stats, err := WriteSnapshot(path, st, nil, src.Memory())
	require.NoError(t, err)
	require.Greater(t, stats.ZeroPages, stats.Pages, "zero pages elided")
	require.Less(t, stats.Bytes, int64(1<<20), "a mostly empty 64 MiB guest makes a small file")
	src.Stop()
	_, err = src.Wait()
	require.NoError(t, err)

	// The source's state is self-consistent.
	require.Len(t, st.VCPUs, 2)
	require.Equal(t, uint64(tinyguest.EntryAddr), st.VCPUs[0].Regs.RIP&^0xf, "BSP inside the counter loop")
	require.NotEmpty(t, st.VCPUs[0].MSRs)

	dst := newRestoreTarget(t, 2)
	got, err := ReadSnapshot(path, dst.Memory())
	require.NoError(t, err)
	require.Equal(t, atCut, readCounter(t, dst), "memory restored at the cut")
	require.NoError(t, dst.StartFrom(got))
	require.Eventually(t, func() bool { return readCounter(t, dst) > atCut+1000 }, 30*time.Second, time.Millisecond,
		"the restored guest runs on from the cut")

	// The restored machine's state matches the saved one where the guest
	// cannot have changed it.
	require.NoError(t, dst.Pause())
	st2, err := dst.SaveState()
	require.NoError(t, err)
	require.Equal(t, st.VCPUs[0].Sregs.CR3, st2.VCPUs[0].Sregs.CR3)
	require.Equal(t, st.VCPUs[1].MPState, st2.VCPUs[1].MPState, "the AP still waits for SIPI")
	require.Equal(t, st.IRQChip.IOAPIC.Chip[:16], st2.IRQChip.IOAPIC.Chip[:16])
}

// A damaged snapshot is refused with a clear error and nothing runs.
func TestSnapshotCorruptRefused(t *testing.T) {
	kvmtest.Require(t)
	src, _ := startTiny(t, 1, tinyguest.Counter(counterGPA))
	require.Eventually(t, func() bool { return readCounter(t, src) > 10 }, 30*time.Second, time.Millisecond)
	require.NoError(t, src.Pause())
	st, err := src.SaveState()
	require.NoError(t, err)
	dir := t.TempDir()
	path := filepath.Join(dir, "vm.snap")
	_, err = WriteSnapshot(path, st, nil, src.Memory())
	require.NoError(t, err)
	good, err := os.ReadFile(path)
	require.NoError(t, err)

	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, b, 0o644))
		return p
	}
	flip := append([]byte(nil), good...)
	flip[len(flip)-100] ^= 0x40 // inside the page data
	foreign := append([]byte("NOTASNAP"), good[8:]...)
	cases := map[string]string{
		"truncated in pages": write("trunc", good[:len(good)-200]),
		"truncated in state": write("trunc2", good[:40]),
		"flipped page bit":   write("flip", flip),
		"foreign":            write("foreign", foreign),
		"empty":              write("empty", nil),
	}
	for name, p := range cases {
		t.Run(name, func(t *testing.T) {
			dst := newRestoreTarget(t, 1)
			_, err := ReadSnapshot(p, dst.Memory())
			require.ErrorIs(t, err, ErrSnapshot)
		})
	}
	t.Run("other machine shape", func(t *testing.T) {
		dst := newRestoreTarget(t, 2)
		got, err := ReadSnapshot(path, dst.Memory())
		require.NoError(t, err)
		require.ErrorIs(t, dst.StartFrom(got), ErrStateMismatch)
		select {
		case <-dst.Done():
			t.Fatal("a refused restore must not start or stop the machine")
		default:
		}
	})
}

// BenchmarkSaveState measures the machine-state part of a checkpoint
// pause (vCPU registers over KVM ioctls, interrupt controllers, clock,
// devices, encoding) for a paused 1-vCPU machine.
func BenchmarkSaveState(b *testing.B) {
	m := pausedCounter(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		st, err := m.SaveState()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := st.MarshalBinary(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(m.msrs)), "msrs")
}

// A machine started paused from a snapshot runs not one guest instruction
// until Resume: its registers, devices and memory are the saved ones
// (the counter the guest increments in a loop has not moved), and after
// Resume it carries on from there.
func TestStartFromPausedRunsNothing(t *testing.T) {
	kvmtest.Require(t)
	src, _ := startTiny(t, 2, tinyguest.Counter(counterGPA))
	require.Eventually(t, func() bool { return readCounter(t, src) > 1000 }, 30*time.Second, time.Millisecond)
	path := filepath.Join(t.TempDir(), "vm.snap")
	_, err := src.Snapshot(context.Background(), path, nil)
	require.NoError(t, err)
	src.Stop()

	dst := newRestoreTarget(t, 2)
	st, err := ReadSnapshot(path, dst.Memory())
	require.NoError(t, err)
	atCut := readCounter(t, dst)
	require.NoError(t, dst.StartFromPaused(st))
	require.True(t, dst.Paused())
	again, err := dst.SaveState()
	require.NoError(t, err)
	for i := range st.VCPUs {
		require.Equal(t, st.VCPUs[i].Regs, again.VCPUs[i].Regs, "vcpu %d", i)
		require.Equal(t, st.VCPUs[i].MPState, again.VCPUs[i].MPState, "vcpu %d", i)
	}
	require.Equal(t, st.Devices, again.Devices)
	require.Equal(t, atCut, readCounter(t, dst), "not one increment before Resume")

	require.NoError(t, dst.Resume())
	require.False(t, dst.Paused())
	require.Eventually(t, func() bool { return readCounter(t, dst) > atCut+1000 }, 30*time.Second, time.Millisecond,
		"after Resume the guest runs on from the cut")
}
