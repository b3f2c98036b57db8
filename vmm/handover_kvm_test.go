package vmm

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/tinyguest"
	"govmm/vmm/devstate"
)

// countingDev is a stateful device that counts quiesces and resumes.
type countingDev struct{ quiesced, resumed atomic.Int32 }

func (d *countingDev) StateID() string               { return "count0" }
func (d *countingDev) StateKind() string             { return "count" }
func (d *countingDev) Quiesce(context.Context) error { d.quiesced.Add(1); return nil }
func (d *countingDev) SaveState() (devstate.State, error) {
	return devstate.State{ID: "count0", Kind: "count"}, nil
}
func (d *countingDev) RestoreState(devstate.State) error { return nil }
func (d *countingDev) Resume() error                     { d.resumed.Add(1); return nil }

// A machine handed over at a cut never runs again: leaving WithPaused
// resumes neither the vCPUs nor the devices (a resumed device would send
// queued frames and execute queued disk writes while the destination runs
// the guest), a later Resume is refused, and a later cut (a snapshot)
// still works without resuming anything.
func TestHandOverNeverRunsAgain(t *testing.T) {
	dev := &countingDev{}
	m, _ := startTinyWith(t, 2, tinyguest.Counter(counterGPA), func(m *Machine) {
		require.NoError(t, m.AddStateful(dev))
	})
	require.Eventually(t, func() bool { return readCounter(t, m) > 1000 }, 30*time.Second, time.Millisecond)

	require.ErrorIs(t, m.HandOver(), ErrNotPaused, "only at a cut")
	require.NoError(t, m.WithPaused(context.Background(), func() error { return m.HandOver() }))
	require.True(t, m.HandedOver())
	require.True(t, m.Paused())
	assert.Equal(t, int32(1), dev.quiesced.Load())
	assert.Zero(t, dev.resumed.Load(), "the devices stay quiesced after the handover")
	atCut := readCounter(t, m)
	time.Sleep(50 * time.Millisecond) // a guest that ran on would count meanwhile
	assert.Equal(t, atCut, readCounter(t, m), "the guest never runs here again")

	require.ErrorIs(t, m.Resume(), ErrHandedOver)
	require.ErrorIs(t, m.ResumeDevices(), ErrHandedOver)
	_, err := m.SaveState()
	require.NoError(t, err, "the state can still be read")
	require.NoError(t, m.WithPaused(context.Background(), func() error { return nil }))
	assert.Zero(t, dev.resumed.Load())
	assert.Equal(t, atCut, readCounter(t, m))
}
