package vmm

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/tinyguest"
	"govmm/kvmapi"
)

// savedTiny runs a counter guest, changing the CPUID it boots with first
// (edit gets KVM's supported CPUID), and returns its state at a cut with
// the counter's value, memory copied into a fresh machine of the same
// shape.
func savedTiny(t *testing.T, edit func([]kvmapi.CPUIDEntry)) (*MachineState, *Machine) {
	t.Helper()
	src, _ := startTinyWith(t, 1, tinyguest.Counter(counterGPA), func(m *Machine) {
		if edit != nil {
			edit(m.cpuid)
		}
	})
	require.Eventually(t, func() bool { return readCounter(t, src) > 1000 }, 30*time.Second, time.Millisecond)
	require.NoError(t, src.Pause())
	require.NoError(t, src.QuiesceDevices(context.Background()))
	st, err := src.SaveState()
	require.NoError(t, err)
	dst := newRestoreTarget(t, 1)
	for _, r := range src.Memory().Regions() {
		require.NoError(t, dst.Memory().WriteAt(r.Host, r.GPA))
	}
	src.Stop()
	_, _ = src.Wait()
	return st, dst
}

// leaf returns a pointer to leaf function/index in entries.
func leaf(t *testing.T, entries []kvmapi.CPUIDEntry, function, index uint32) *kvmapi.CPUIDEntry {
	for i := range entries {
		if entries[i].Function == function && entries[i].Index == index {
			return &entries[i]
		}
	}
	t.Fatalf("no cpuid leaf %#x.%d", function, index)
	return nil
}

// A guest that booted with a CPU feature this host's KVM does not offer
// is refused before anything runs, with the feature named; a guest that
// booted with fewer features than offered here gets back exactly the
// CPUID it booted with, not this host's.
func TestRestoreKeepsTheGuestsCPUID(t *testing.T) {
	var missing uint32
	st, dst := savedTiny(t, func(c []kvmapi.CPUIDEntry) {
		l := leaf(t, c, 7, 0)
		for b := uint32(0); b < 32; b++ {
			if l.EBX&(1<<b) == 0 {
				missing = b
				break
			}
		}
		l.EBX |= 1 << missing
	})
	require.NotZero(t, leaf(t, st.VCPUs[0].CPUID, 7, 0).EBX&(1<<missing), "the state carries the CPUID the guest saw")
	err := dst.CheckState(st)
	require.ErrorIs(t, err, ErrStateMismatch)
	require.ErrorContains(t, err, fmt.Sprintf("7.0.EBX bits %d", missing))
	require.ErrorIs(t, dst.StartFrom(st), ErrStateMismatch)

	st, dst = savedTiny(t, func(c []kvmapi.CPUIDEntry) {
		l := leaf(t, c, 1, 0)
		l.ECX &^= 1 << 0 // SSE3: the guest never saw it
	})
	require.Zero(t, leaf(t, st.VCPUs[0].CPUID, 1, 0).ECX&1)
	require.NoError(t, dst.StartFrom(st))
	require.NoError(t, dst.Pause())
	again, err := dst.SaveState()
	require.NoError(t, err)
	assert.Zero(t, leaf(t, again.VCPUs[0].CPUID, 1, 0).ECX&1, "the restored guest still lacks SSE3")
}

// The guest's TSC rate travels with its state: restored on a machine
// whose rate differs, the vCPU runs at the saved rate (KVM scales it, or
// catches up to a faster one); a slower rate that KVM cannot give is
// refused before anything runs.
func TestRestoreKeepsTheGuestsTSCRate(t *testing.T) {
	st, dst := savedTiny(t, nil)
	require.NotZero(t, st.TSCKHz)
	here := st.TSCKHz
	st.TSCKHz = here + here/10
	require.NoError(t, dst.StartFrom(st))
	require.NoError(t, dst.Pause())
	again, err := dst.SaveState()
	require.NoError(t, err)
	assert.Equal(t, st.TSCKHz, again.TSCKHz)
	before := readCounter(t, dst)
	require.NoError(t, dst.Resume())
	require.Eventually(t, func() bool { return readCounter(t, dst) > before+1000 }, 30*time.Second, time.Millisecond)

	st, dst = savedTiny(t, nil)
	st.TSCKHz = here - here/10
	if dst.sys.CheckExtension(kvmapi.CapTSCControl) > 0 {
		require.NoError(t, dst.StartFrom(st), "KVM here scales the TSC")
		return
	}
	err = dst.CheckState(st)
	require.ErrorIs(t, err, ErrStateMismatch)
	require.ErrorContains(t, err, "cannot scale")
}

// The guest is offered the LAPIC's TSC-deadline timer whenever KVM has it
// (KVM_CAP_TSC_DEADLINE_TIMER), even where KVM_GET_SUPPORTED_CPUID leaves
// the bit out: Linux then never calibrates its LAPIC timer, a check that a
// boot slowed by checkpoint pauses can fail, leaving the guest on the PIT.
func TestTSCDeadlineOffered(t *testing.T) {
	st, dst := savedTiny(t, nil)
	has := dst.sys.CheckExtension(kvmapi.CapTSCDeadlineTimer) > 0
	require.Equal(t, has, leaf(t, st.VCPUs[0].CPUID, 1, 0).ECX&ecxTSCDeadline != 0)
}
