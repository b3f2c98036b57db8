package vmm

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/kvmapi"
)

// The filter denies, read and write, every counter MSR a Linux guest
// probes, and nothing else nearby.
func TestPMUMSRFilter(t *testing.T) {
	denied := func(msr uint32) bool {
		for _, r := range pmuMSRFilter() {
			if msr >= r.Base && msr < r.Base+uint32(len(r.Allow)) {
				require.Equal(t, uint32(kvmapi.MSRFilterRead|kvmapi.MSRFilterWrite), r.Flags)
				return !r.Allow[msr-r.Base]
			}
		}
		return false
	}
	for _, msr := range []uint32{0xc0010000, 0xc0010004, 0xc0010007, 0xc0010200, 0xc001020b, 0xc0000301, 0xc1, 0x186, 0x38f} {
		require.True(t, denied(msr), "%#x", msr)
	}
	for _, msr := range []uint32{0xc0000080 /* EFER */, 0xc0010008, 0x10 /* TSC */, 0x1b /* APIC base */, 0x174, 0xc0000100} {
		require.False(t, denied(msr), "%#x", msr)
	}
	require.LessOrEqual(t, len(pmuMSRFilter()), 16, "KVM takes at most 16 ranges")
}

// rdmsrThenExit is a tiny guest: rdmsr of msr, then exit status 7. Without
// an IDT, a #GP from the rdmsr ends in a triple fault instead.
func rdmsrThenExit(msr uint32) []byte {
	return cat([]byte{0xb9, byte(msr), byte(msr >> 8), byte(msr >> 16), byte(msr >> 24)}, // mov ecx, msr
		[]byte{0x0f, 0x32}, // rdmsr
		asmMovAL(7), asmExitAL)
}

// On real KVM: the guest's RDMSR of a PMU counter faults (the filter at
// work), while an ordinary MSR still reads.
func TestPMUMSRsFaultInGuest(t *testing.T) {
	m, _ := startTiny(t, 1, rdmsrThenExit(0xc0000080)) // EFER
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, 7, res.Status)

	if m.vm.CheckExtension(kvmapi.CapX86MSRFilter) <= 0 {
		t.Skip("this KVM has no MSR filter (KVM_CAP_X86_MSR_FILTER, Linux 5.10)")
	}
	m, _ = startTiny(t, 1, rdmsrThenExit(0xc0010007)) // K7 PERF_CTR3
	_, err = waitResult(t, m)
	var ee *kvmapi.ExitError
	require.True(t, errors.As(err, &ee), "want a triple fault from #GP, got %v", err)
	require.Equal(t, kvmapi.ExitShutdown, ee.Reason)
}
