package vmm

import (
	"fmt"

	"govmm/kvmapi"
)

// The guest gets no performance monitoring unit. A vPMU's counters are
// not part of MachineState, so they would not survive a snapshot, a
// migration or a failover; and where KVM has no PMU to back one (nested,
// as in the lab, or a host without perf), a stock Linux guest on an AMD
// CPU still probes the legacy K7 counters (AMD defines them for every
// family from 6 on, whatever CPUID says), and KVM logs every write it
// drops ("Unhandled WRMSR(0xc0010007)"). So govmm
//
//   - disables KVM's vPMU for the VM (KVM_CAP_PMU_CAPABILITY) where it can,
//   - hides the PMU from CPUID (ShapeCPUID: leaf 0xa, AMD's PerfCtrExt*
//     bits and leaf 0x80000022), and
//   - denies the guest the PMU's MSRs with an MSR filter, so that its probe
//     gets the #GP a CPU without counters gives (Linux then says "PMU not
//     available due to virtualization") instead of a write KVM drops.

// pmuMSRRanges are the counter and control MSRs of every PMU generation a
// guest may probe.
var pmuMSRRanges = []struct {
	base, n uint32
	what    string
}{
	{0xc1, 8, "Intel IA32_PMC0..7"},
	{0x186, 8, "Intel IA32_PERFEVTSEL0..7"},
	{0x309, 3, "Intel fixed counters"},
	{0x38d, 4, "Intel fixed control, global status/control/overflow"},
	{0xc0000300, 4, "AMD PerfMonV2 global"},
	{0xc0010000, 8, "AMD K7 PERF_CTL0..3, PERF_CTR0..3"},
	{0xc0010200, 12, "AMD F15h core PERF_CTL/CTR0..5"},
	{0xc0010230, 8, "AMD L2I PERF_CTL/CTR0..3"},
	{0xc0010240, 8, "AMD northbridge PERF_CTL/CTR0..3"},
}

// pmuMSRFilter denies the guest every MSR of pmuMSRRanges, read and write.
func pmuMSRFilter() []kvmapi.MSRFilterRange {
	var out []kvmapi.MSRFilterRange
	for _, r := range pmuMSRRanges {
		out = append(out, kvmapi.MSRFilterRange{
			Flags: kvmapi.MSRFilterRead | kvmapi.MSRFilterWrite,
			Base:  r.base,
			Allow: make([]bool, r.n), // all false: denied
		})
	}
	return out
}

// hidePMU disables the vPMU and installs the MSR filter. Call before any
// vCPU exists (KVM refuses KVM_CAP_PMU_CAPABILITY afterwards). A KVM
// without these capabilities (before 5.10 and 5.18) keeps its defaults.
func hidePMU(sys *kvmapi.System, vm *kvmapi.VM) error {
	if sys.CheckExtension(kvmapi.CapPMUCapability)&kvmapi.PMUCapDisable != 0 {
		if err := vm.EnableCap(kvmapi.CapPMUCapability, kvmapi.PMUCapDisable); err != nil {
			return fmt.Errorf("disable the vPMU: %w", err)
		}
	}
	if vm.CheckExtension(kvmapi.CapX86MSRFilter) > 0 {
		if err := vm.SetMSRFilter(kvmapi.MSRFilterDefaultAllow, pmuMSRFilter()); err != nil {
			return fmt.Errorf("deny the PMU's MSRs: %w", err)
		}
	}
	return nil
}
