package vmm

import (
	"math/bits"

	"govmm/kvmapi"
)

// CPUID leaves and bits that ShapeCPUID touches.
const (
	cpuidFeatures     = 0x1
	cpuidCacheParams  = 0x4
	cpuidArchPerfmon  = 0xa
	cpuidTopology     = 0xb
	cpuidTopologyV2   = 0x1f
	cpuidExtFeatures  = 0x80000001
	cpuidExtAddrSize  = 0x80000008
	cpuidExtAPICID    = 0x8000001e
	cpuidExtPerfmonV2 = 0x80000022
	ecxHypervisor     = 1 << 31
	edxHTT            = 1 << 28
	ecxCmpLegacy      = 1 << 1 // 0x80000001 ECX (AMD)
	// 0x80000001 ECX (AMD): core, northbridge and last-level-cache
	// performance counter extensions.
	ecxPerfCtrExtCore  = 1 << 23
	ecxPerfCtrExtNB    = 1 << 24
	ecxPerfCtrExtLLC   = 1 << 28
	ecxPerfCtrExt      = ecxPerfCtrExtCore | ecxPerfCtrExtNB | ecxPerfCtrExtLLC
	topoLevelSMT       = 1
	topoLevelCore      = 2
	topoLevelTypeShift = 8
)

// ShapeCPUID adapts KVM's supported CPUID to vCPU id of ncpus: one package
// of ncpus cores with one thread each, the APIC ID equal to the vCPU id,
// the hypervisor bit set, and no performance monitoring (see pmu.go). It
// returns a new slice.
func ShapeCPUID(supported []kvmapi.CPUIDEntry, id, ncpus int) []kvmapi.CPUIDEntry {
	coreBits := uint32(bits.Len(uint(ncpus - 1))) // bits of APIC ID per core
	out := make([]kvmapi.CPUIDEntry, 0, len(supported))
	for _, e := range supported {
		switch e.Function {
		case cpuidFeatures:
			e.EBX = e.EBX&0x0000ffff | uint32(id)<<24 | uint32(ncpus)<<16
			e.ECX |= ecxHypervisor
			if ncpus > 1 {
				e.EDX |= edxHTT
			} else {
				e.EDX &^= edxHTT
			}
		case cpuidCacheParams:
			// EAX[31:26]: cores per package - 1. Keep the cache's own
			// sharing field consistent: one thread per core.
			e.EAX = e.EAX&0x03ff_ffff | uint32(ncpus-1)<<26
			e.EAX &^= 0xfff << 14
		case cpuidTopology, cpuidTopologyV2:
			e.EDX = uint32(id)
			switch e.Index {
			case 0: // SMT level: one thread per core
				e.EAX, e.EBX = 0, 1
				e.ECX = topoLevelSMT<<topoLevelTypeShift | 0
			case 1: // core level: ncpus cores per package
				e.EAX, e.EBX = coreBits, uint32(ncpus)
				e.ECX = topoLevelCore<<topoLevelTypeShift | 1
			default:
				e.EAX, e.EBX = 0, 0
				e.ECX = e.Index
			}
		case cpuidArchPerfmon, cpuidExtPerfmonV2:
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0
		case cpuidExtFeatures:
			if ncpus > 1 {
				e.ECX |= ecxCmpLegacy
			} else {
				e.ECX &^= ecxCmpLegacy
			}
			e.ECX &^= ecxPerfCtrExt
		case cpuidExtAPICID: // AMD: extended APIC ID and core ID
			e.EAX = uint32(id)
			e.EBX = uint32(id) & 0xff
			e.ECX = 0
		case cpuidExtAddrSize:
			// ECX[7:0]: cores - 1; [15:12]: APIC ID bits for cores.
			e.ECX = e.ECX&^0xf0ff | uint32(ncpus-1) | coreBits<<12
		}
		out = append(out, e)
	}
	return out
}
