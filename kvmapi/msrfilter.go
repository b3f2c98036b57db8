package kvmapi

import (
	"fmt"
	"runtime"
	"unsafe"
)

// MSRFilterRange is one range of struct kvm_msr_filter in Go terms: for
// the MSRs Base..Base+len(Allow)-1, whether the guest may access each
// (for the accesses in Flags). A denied access makes the guest's
// RDMSR/WRMSR raise #GP (or exit to userspace when
// KVM_CAP_X86_USER_SPACE_MSR asks for it; govmm does not).
type MSRFilterRange struct {
	Flags uint32 // MSRFilterRead and/or MSRFilterWrite
	Base  uint32
	Allow []bool
}

// MSR filter flags (KVM API 4.126, KVM_X86_SET_MSR_FILTER).
const (
	MSRFilterDefaultAllow = 0 // kvm_msr_filter.flags: MSRs in no range are allowed
	MSRFilterDefaultDeny  = 1

	MSRFilterRead  = 1 // kvm_msr_filter_range.flags
	MSRFilterWrite = 2

	msrFilterMaxRanges = 16
)

// msrFilterRange is struct kvm_msr_filter_range.
type msrFilterRange struct {
	Flags  uint32
	NMSRs  uint32
	Base   uint32
	_      uint32
	Bitmap uint64 // __u8 *: bit set = allowed
}

// msrFilter is struct kvm_msr_filter.
type msrFilter struct {
	Flags  uint32
	_      uint32
	Ranges [msrFilterMaxRanges]msrFilterRange
}

// SetMSRFilter replaces the VM's MSR filter (KVM_X86_SET_MSR_FILTER, with
// KVM_CAP_X86_MSR_FILTER). It governs the guest's RDMSR and WRMSR only;
// KVM_GET_MSRS and KVM_SET_MSRS from userspace are never filtered.
func (vm *VM) SetMSRFilter(flags uint32, ranges []MSRFilterRange) error {
	if len(ranges) > msrFilterMaxRanges {
		return fmt.Errorf("KVM_X86_SET_MSR_FILTER: %d ranges, at most %d", len(ranges), msrFilterMaxRanges)
	}
	f := msrFilter{Flags: flags}
	bitmaps := make([][]uint8, len(ranges))
	for i, r := range ranges {
		if len(r.Allow) == 0 {
			return fmt.Errorf("KVM_X86_SET_MSR_FILTER: range %d at %#x is empty", i, r.Base)
		}
		bm := make([]uint8, (len(r.Allow)+7)/8)
		for j, ok := range r.Allow {
			if ok {
				bm[j/8] |= 1 << (j % 8)
			}
		}
		bitmaps[i] = bm
		f.Ranges[i] = msrFilterRange{Flags: r.Flags, NMSRs: uint32(len(r.Allow)), Base: r.Base,
			Bitmap: uint64(uintptr(unsafe.Pointer(&bm[0])))}
	}
	_, err := doPtr(vm.fd, "KVM_X86_SET_MSR_FILTER", kvmX86SetMSRFilter, unsafe.Pointer(&f))
	// The kernel copied the bitmaps through pointers the garbage collector
	// cannot see in f: keep them alive until the ioctl returned.
	runtime.KeepAlive(bitmaps)
	return err
}

// PMU capability bits (KVM_CAP_PMU_CAPABILITY, KVM API 7.30).
const PMUCapDisable = 1
