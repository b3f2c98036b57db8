package vmm

import (
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/dirtylog"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/kvmapi"
)

// The machine owns dirty tracking: KVM logs the slots exactly while a
// tracker is open, a second tracker is refused meanwhile (the two would
// steal each other's bits), and after Close the next one may start.
func TestTrackDirtyOneAtATime(t *testing.T) {
	kvmtest.Require(t)
	for _, manual := range []bool{false, true} {
		m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testKernel(tinyguest.Exit(0)),
			Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: DirtyBitmap})
		require.NoError(t, err)
		defer m.Close()
		r := m.Memory().Regions()[0]
		bitmap := make([]uint64, r.BitmapWords())
		require.Error(t, m.vm.DirtyLog(r.Slot, bitmap), "no dirty log before tracking")

		tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.NoError(t, err)
		require.NoError(t, m.vm.DirtyLog(r.Slot, bitmap), "KVM logs slot %d while tracking", r.Slot)
		_, err = m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.ErrorIs(t, err, ErrDirtyTrackingBusy)
		require.NoError(t, m.vm.DirtyLog(r.Slot, bitmap), "a refused tracker leaves the first one's logging on")

		require.NoError(t, tr.Close())
		assert.Error(t, m.vm.DirtyLog(r.Slot, bitmap), "KVM still logs slot %d after Close", r.Slot)
		tr2, err := m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.NoError(t, err, "a new tracker once the first is closed")
		require.NoError(t, tr2.Close())
	}
}

// Config.DirtyTracking: the default is "auto", which takes the bitmap; an
// unknown mode or a ring size KVM cannot take is refused before KVM is
// touched; with "ring" every vCPU maps a ring, KVM refuses the bitmap
// calls, and a tracker still comes and goes one at a time.
func TestDirtyTrackingConfig(t *testing.T) {
	kvmtest.Require(t)
	newM := func(tracking string, entries int) (*Machine, error) {
		m, err := New(Config{MemSize: 64 << 20, CPUs: 2, Kernel: testKernel(tinyguest.Exit(0)),
			Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: tracking, DirtyRingEntries: entries})
		if err == nil {
			t.Cleanup(func() { m.Close() })
		}
		return m, err
	}
	for _, bad := range []struct {
		tracking string
		entries  int
	}{{"fast", 0}, {DirtyRing, 300}, {DirtyRing, 128}} {
		_, err := newM(bad.tracking, bad.entries)
		assert.Error(t, err, "%q with %d entries", bad.tracking, bad.entries)
	}

	m, err := newM("", 0)
	require.NoError(t, err)
	assert.Equal(t, DirtyBitmap, m.DirtyTracking(), "auto")

	m, err = newM(DirtyRing, 0)
	require.NoError(t, err)
	require.Equal(t, DirtyRing, m.DirtyTracking())
	require.NoError(t, m.Start())
	require.Len(t, m.ring.rings, 2, "one ring per vCPU")
	assert.Equal(t, min(DefaultDirtyRingEntries, m.vm.CheckExtension(kvmapi.CapDirtyLogRing)/dirtyGFNSize),
		m.ring.rings[0].Entries())
	tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: true})
	require.NoError(t, err)
	assert.Equal(t, "ring", tr.Source())
	r := m.Memory().Regions()[0]
	assert.ErrorIs(t, m.vm.DirtyLog(r.Slot, make([]uint64, r.BitmapWords())), unix.ENXIO,
		"KVM refuses the bitmap of a VM with rings")
	_, err = m.TrackDirty(dirtylog.Options{})
	require.ErrorIs(t, err, ErrDirtyTrackingBusy)
	require.NoError(t, tr.Close())
	tr, err = m.TrackDirty(dirtylog.Options{})
	require.NoError(t, err)
	require.NoError(t, tr.Close())
}
