package vmm

import (
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/dirtylog"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

// The machine owns dirty tracking: KVM logs the slots exactly while a
// tracker is open, a second tracker is refused meanwhile (the two would
// steal each other's bits), and after Close the next one may start.
func TestTrackDirtyOneAtATime(t *testing.T) {
	kvmtest.Require(t)
	for _, manual := range []bool{false, true} {
		m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testKernel(tinyguest.Exit(0)),
			Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
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
