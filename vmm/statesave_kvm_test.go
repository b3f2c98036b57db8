package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/tinyguest"
	"govmm/kvmapi"
)

// busyGuest changes a little of everything between cuts: 16 pages and a
// pass counter, a byte out of the UART
// and the RTC's index register (devices).
func busyGuest() []byte {
	return tinyguest.Cat(
		tinyguest.DirtierPass(0x400000, 16, counterGPA),
		tinyguest.MovAL('.'), tinyguest.OutSerial(),
		[]byte{0xb0, 0x0a, 0xe6, 0x70, 0xe4, 0x71}, // mov al, 0x0a; out 0x70, al; in al, 0x71
	)
}

// msrTSC is IA32_TSC, which a save reads through KVM_GET_MSRS.
const msrTSC = 0x10

// hvClockMSRs are Hyper-V's clocks that KVM emulates and lists for
// KVM_GET_MSRS where it offers Hyper-V enlightenments (kvm_amd in the lab;
// kvm_pvm lists neither): the partition reference counter
// (HV_X64_MSR_TIME_REF_COUNT) and the vCPU's run time
// (HV_X64_MSR_VP_RUNTIME, read from the vCPU thread's own run time, which
// the save's ioctls add to). Both change between two saves of a paused
// machine.
var hvClockMSRs = []uint32{0x40000020, 0x40000010}

// withoutClocks is an encoded state with what runs on by itself while
// the machine is paused, the TSC, Hyper-V's clocks (where KVM has them)
// and the KVM clock, zeroed (the TSC and the KVM clock checked to be
// there): two saves at the same cut differ in them by the time between
// the two, and in nothing else.
func withoutClocks(t *testing.T, b []byte) []byte {
	t.Helper()
	var st MachineState
	require.NoError(t, st.UnmarshalBinary(b))
	require.NotZero(t, st.Clock.Clock)
	st.Clock = kvmapi.ClockData{}
	for i := range st.VCPUs {
		found := false
		for j := range st.VCPUs[i].MSRs {
			switch idx := st.VCPUs[i].MSRs[j].Index; {
			case idx == msrTSC:
				st.VCPUs[i].MSRs[j].Data, found = 0, true
			case slices.Contains(hvClockMSRs, idx):
				st.VCPUs[i].MSRs[j].Data = 0
			}
		}
		require.True(t, found, "vcpu %d saves the TSC", i)
	}
	out, err := st.MarshalBinary()
	require.NoError(t, err)
	return out
}

// EncodeState, which reuses its buffers and the TSC rate from one save to
// the next and reads REGS, SREGS and VCPU_EVENTS through the sync
// registers, gives at every cut of a running 2-vCPU guest the same bytes
// as a full save (SaveState then MarshalBinary) at the same cut, but for
// the TSC and the KVM clock, which advance between the two; and the
// sync registers equal what KVM_GET_REGS, KVM_GET_SREGS and
// KVM_GET_VCPU_EVENTS return there.
//
// Both ways a cut may go: vCPU threads that sleep between the cut's
// requests, reading their state while the cut does nothing else
// (EncodeState); and vCPU threads that poll for them (Machine.spin),
// reading their state while the cut's own goroutine works at the same cut
// (EncodeStateWhile, here reading guest memory, which must not move).
func TestEncodeStateMatchesFullSave(t *testing.T) {
	for _, spin := range []time.Duration{0, 500 * time.Microsecond} {
		t.Run(fmt.Sprintf("spin=%v", spin), func(t *testing.T) { testEncodeStateMatchesFullSave(t, spin) })
	}
}

func testEncodeStateMatchesFullSave(t *testing.T, spin time.Duration) {
	code := busyGuest()
	code = append(code, 0xeb, byte(-(len(code) + 2))) // jmp to the start
	m, _ := startTinyWith(t, 2, code, func(m *Machine) { m.spin = spin })
	ctx := context.Background()
	counter := func() uint64 {
		b, err := m.Memory().Slice(counterGPA, 8)
		require.NoError(t, err)
		return binary.LittleEndian.Uint64(b)
	}
	encode := m.EncodeState
	if spin > 0 {
		encode = func() ([]byte, error) {
			calls := 0
			b, err := m.EncodeStateWhile(func() error {
				calls++
				c := counter()
				time.Sleep(200 * time.Microsecond)
				if counter() != c {
					return errors.New("the guest ran during meanwhile")
				}
				return nil
			})
			require.Equal(t, 1, calls, "meanwhile runs once a save")
			return b, err
		}
	}
	var prev []byte
	const epochs = 200
	for i := 0; i < epochs; i++ {
		require.NoError(t, m.Pause())
		require.NoError(t, m.QuiesceDevices(ctx))
		// The reference first: every field by its own ioctl, as before
		// the sync registers. (SyncedState's KVM_RUN reloads and saves
		// the guest's FPU, after which XSAVE may report a component in
		// its initial state by a clear XSTATE_BV bit rather than by
		// zeros: the same state in other bytes. A save reads XSAVE
		// before that run, so each sees the bytes the pause left.)
		sync := m.syncRegs
		m.syncRegs = false
		full, err := m.SaveState()
		m.syncRegs = sync
		require.NoError(t, err)
		inc, err := encode()
		require.NoError(t, err)
		want, err := full.MarshalBinary()
		require.NoError(t, err)
		if w, g := withoutClocks(t, want), withoutClocks(t, inc); !bytes.Equal(w, g) {
			var ws, gs MachineState
			require.NoError(t, ws.UnmarshalBinary(w))
			require.NoError(t, gs.UnmarshalBinary(g))
			require.Equal(t, ws, gs, "epoch %d: incremental save differs from a full one", i)
			require.Equal(t, w, g, "epoch %d: incremental save differs from a full one", i)
		}
		if m.syncRegs {
			require.NoError(t, m.OnVCPUs(func(id int, fd *kvmapi.VCPU) error {
				r, s, e, err := fd.SyncedState()
				require.NoError(t, err)
				r2, err := fd.Regs()
				require.NoError(t, err)
				s2, err := fd.Sregs()
				require.NoError(t, err)
				e2, err := fd.VCPUEvents()
				require.NoError(t, err)
				require.Equal(t, r2, r, "epoch %d vcpu %d regs", i, id)
				require.Equal(t, s2, s, "epoch %d vcpu %d sregs", i, id)
				require.Equal(t, e2, e, "epoch %d vcpu %d events", i, id)
				return nil
			}))
		}
		if prev != nil {
			require.NotEqual(t, prev, inc, "epoch %d: the guest ran, its state must differ", i)
		}
		prev = inc
		var st MachineState
		require.NoError(t, st.UnmarshalBinary(inc))
		require.NotZero(t, st.TSCKHz)
		before := counter()
		require.NoError(t, m.ResumeDevices())
		require.NoError(t, m.Resume())
		require.Eventually(t, func() bool { return counter() > before }, 30*time.Second, 50*time.Microsecond)
	}
}

// A failing meanwhile fails the save: its error comes back, no state, and
// the machine goes on as after any cut.
func TestEncodeStateWhileReturnsMeanwhilesError(t *testing.T) {
	m, _ := startTiny(t, 2, tinyguest.Counter(counterGPA))
	ctx := context.Background()
	boom := errors.New("boom")
	require.NoError(t, m.WithPaused(ctx, func() error {
		b, err := m.EncodeStateWhile(func() error { return boom })
		require.ErrorIs(t, err, boom)
		require.Nil(t, b)
		b, err = m.EncodeStateWhile(nil)
		require.NoError(t, err)
		require.NotEmpty(t, b)
		return nil
	}))
	_, err := m.EncodeStateWhile(func() error { return nil })
	require.ErrorIs(t, err, ErrNotPaused)
}
