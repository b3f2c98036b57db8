//go:build cgo

// Package kabi reports the kernel's own view of the KVM ABI, computed by
// the C compiler from <linux/kvm.h>: struct sizes, field offsets and ioctl
// numbers. Only kvmapi's ABI test imports it; nothing at run time does.
package kabi

/*
#include <stddef.h>
#include <linux/kvm.h>

#define S(t) { #t, sizeof(struct t) }
#define O(t, f) { #t "." #f, offsetof(struct t, f) }
#define I(x) { #x, x }

struct kv { const char *name; unsigned long value; };

struct kv kvs[] = {
	S(kvm_regs), S(kvm_segment), S(kvm_dtable), S(kvm_sregs), S(kvm_fpu),
	S(kvm_xsave), S(kvm_xcrs), S(kvm_xcr), S(kvm_msr_entry), S(kvm_msrs), S(kvm_msr_list),
	S(kvm_lapic_state), S(kvm_vcpu_events), S(kvm_mp_state), S(kvm_debugregs),
	S(kvm_irqchip), S(kvm_pit_channel_state), S(kvm_pit_state2), S(kvm_pit_config),
	S(kvm_clock_data), S(kvm_cpuid_entry2), S(kvm_cpuid2), S(kvm_userspace_memory_region),
	S(kvm_dirty_log), S(kvm_clear_dirty_log), S(kvm_irq_level),
	S(kvm_ioeventfd), S(kvm_msi),
	S(kvm_enable_cap), S(kvm_run), S(kvm_msr_filter), S(kvm_msr_filter_range),
	S(kvm_stats_header), S(kvm_stats_desc),
	S(kvm_pic_state), S(kvm_ioapic_state), S(kvm_dirty_gfn),
	S(kvm_coalesced_mmio_zone), S(kvm_coalesced_mmio), S(kvm_coalesced_mmio_ring),

	O(kvm_regs, rip), O(kvm_regs, rflags),
	O(kvm_segment, selector), O(kvm_segment, type), O(kvm_segment, unusable),
	O(kvm_dtable, limit),
	O(kvm_sregs, tr), O(kvm_sregs, ldt), O(kvm_sregs, gdt), O(kvm_sregs, idt),
	O(kvm_sregs, cr0), O(kvm_sregs, efer), O(kvm_sregs, apic_base), O(kvm_sregs, interrupt_bitmap),
	O(kvm_fpu, fcw), O(kvm_fpu, ftwx), O(kvm_fpu, last_opcode), O(kvm_fpu, last_ip),
	O(kvm_fpu, xmm), O(kvm_fpu, mxcsr),
	O(kvm_xcrs, xcrs), O(kvm_xcr, value),
	O(kvm_msr_entry, data), O(kvm_msrs, entries),
	O(kvm_vcpu_events, interrupt), O(kvm_vcpu_events, nmi), O(kvm_vcpu_events, sipi_vector),
	O(kvm_vcpu_events, flags), O(kvm_vcpu_events, smi), O(kvm_vcpu_events, triple_fault),
	O(kvm_vcpu_events, exception_has_payload), O(kvm_vcpu_events, exception_payload),
	O(kvm_debugregs, dr6), O(kvm_debugregs, dr7), O(kvm_debugregs, flags),
	O(kvm_irqchip, chip),
	O(kvm_pit_channel_state, latched_count), O(kvm_pit_channel_state, status),
	O(kvm_pit_channel_state, gate), O(kvm_pit_channel_state, count_load_time),
	O(kvm_pit_state2, flags),
	O(kvm_clock_data, flags), O(kvm_clock_data, realtime), O(kvm_clock_data, host_tsc),
	O(kvm_cpuid_entry2, eax), O(kvm_cpuid_entry2, edx), O(kvm_cpuid2, entries),
	O(kvm_userspace_memory_region, guest_phys_addr), O(kvm_userspace_memory_region, userspace_addr),
	O(kvm_dirty_log, dirty_bitmap), O(kvm_clear_dirty_log, first_page), O(kvm_clear_dirty_log, dirty_bitmap),
	O(kvm_ioeventfd, len), O(kvm_ioeventfd, fd), O(kvm_ioeventfd, flags),
	O(kvm_msi, devid),
	O(kvm_enable_cap, args),
	O(kvm_dirty_gfn, slot), O(kvm_dirty_gfn, offset),
	O(kvm_coalesced_mmio_zone, size), O(kvm_coalesced_mmio_zone, pio),
	O(kvm_coalesced_mmio, len), O(kvm_coalesced_mmio, pio), O(kvm_coalesced_mmio, data),
	O(kvm_coalesced_mmio_ring, last), O(kvm_coalesced_mmio_ring, coalesced_mmio),
	O(kvm_msr_filter, ranges), O(kvm_msr_filter_range, base), O(kvm_msr_filter_range, bitmap),
	O(kvm_stats_header, data_offset), O(kvm_stats_desc, offset), O(kvm_stats_desc, bucket_size),
	O(kvm_stats_desc, name),
	O(kvm_run, immediate_exit), O(kvm_run, exit_reason), O(kvm_run, io), O(kvm_run, mmio),
	O(kvm_run, io.size), O(kvm_run, io.port), O(kvm_run, io.count), O(kvm_run, io.data_offset),
	O(kvm_run, mmio.data), O(kvm_run, mmio.len), O(kvm_run, mmio.is_write),
	O(kvm_run, fail_entry.cpu), O(kvm_run, internal.ndata), O(kvm_run, internal.data),
	O(kvm_run, system_event.ndata), O(kvm_run, system_event.data),
	O(kvm_run, kvm_valid_regs), O(kvm_run, kvm_dirty_regs), O(kvm_run, s.regs.regs),
	O(kvm_run, s.regs.sregs), O(kvm_run, s.regs.events),

	I(KVM_GET_API_VERSION), I(KVM_CREATE_VM), I(KVM_GET_MSR_INDEX_LIST), I(KVM_CHECK_EXTENSION),
	I(KVM_GET_VCPU_MMAP_SIZE), I(KVM_GET_SUPPORTED_CPUID),
	I(KVM_CREATE_VCPU), I(KVM_GET_DIRTY_LOG), I(KVM_SET_USER_MEMORY_REGION), I(KVM_SET_TSS_ADDR),
	I(KVM_SET_IDENTITY_MAP_ADDR), I(KVM_CREATE_IRQCHIP), I(KVM_IRQ_LINE), I(KVM_GET_IRQCHIP),
	I(KVM_SET_IRQCHIP), I(KVM_CREATE_PIT2), I(KVM_IOEVENTFD),
	I(KVM_SET_CLOCK), I(KVM_GET_CLOCK), I(KVM_GET_PIT2), I(KVM_SET_PIT2), I(KVM_ENABLE_CAP),
	I(KVM_SIGNAL_MSI), I(KVM_CLEAR_DIRTY_LOG), I(KVM_X86_SET_MSR_FILTER), I(KVM_GET_STATS_FD),
	I(KVM_RUN), I(KVM_GET_REGS), I(KVM_SET_REGS), I(KVM_GET_SREGS), I(KVM_SET_SREGS),
	I(KVM_GET_MSRS), I(KVM_SET_MSRS), I(KVM_GET_FPU), I(KVM_SET_FPU), I(KVM_GET_LAPIC),
	I(KVM_SET_LAPIC), I(KVM_SET_CPUID2), I(KVM_GET_MP_STATE), I(KVM_SET_MP_STATE),
	I(KVM_GET_VCPU_EVENTS), I(KVM_SET_VCPU_EVENTS), I(KVM_GET_DEBUGREGS), I(KVM_SET_DEBUGREGS),
	I(KVM_GET_XSAVE), I(KVM_SET_XSAVE), I(KVM_GET_XCRS), I(KVM_SET_XCRS),
	I(KVM_GET_TSC_KHZ), I(KVM_SET_TSC_KHZ), I(KVM_GET_XSAVE2), I(KVM_RESET_DIRTY_RINGS),
	I(KVM_REGISTER_COALESCED_MMIO),

	I(KVM_EXIT_IO), I(KVM_EXIT_MMIO), I(KVM_EXIT_SHUTDOWN), I(KVM_EXIT_FAIL_ENTRY),
	I(KVM_EXIT_INTERNAL_ERROR), I(KVM_EXIT_SYSTEM_EVENT), I(KVM_EXIT_HLT), I(KVM_EXIT_INTR),
	I(KVM_EXIT_IO_IN), I(KVM_EXIT_IO_OUT), I(KVM_EXIT_DIRTY_RING_FULL),
	I(KVM_MEM_LOG_DIRTY_PAGES),
	I(KVM_CAP_XSAVE2), I(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
	I(KVM_CAP_IMMEDIATE_EXIT), I(KVM_CAP_IOEVENTFD), I(KVM_CAP_SIGNAL_MSI),
	I(KVM_CAP_TSC_CONTROL), I(KVM_CAP_TSC_DEADLINE_TIMER), I(KVM_CAP_SYNC_REGS),
	I(KVM_SYNC_X86_REGS), I(KVM_SYNC_X86_SREGS), I(KVM_SYNC_X86_EVENTS),
	I(KVM_CLOCK_TSC_STABLE), I(KVM_CLOCK_REALTIME), I(KVM_CLOCK_HOST_TSC),
	I(KVM_CAP_X86_MSR_FILTER), I(KVM_CAP_PMU_CAPABILITY), I(KVM_PMU_CAP_DISABLE),
	I(KVM_MSR_FILTER_DEFAULT_ALLOW), I(KVM_MSR_FILTER_DEFAULT_DENY), I(KVM_MSR_FILTER_READ), I(KVM_MSR_FILTER_WRITE),
	I(KVM_CAP_DIRTY_LOG_RING), I(KVM_CAP_DIRTY_LOG_RING_ACQ_REL), I(KVM_DIRTY_LOG_PAGE_OFFSET),
	I(KVM_DIRTY_GFN_F_DIRTY), I(KVM_DIRTY_GFN_F_RESET),
	I(KVM_CAP_COALESCED_MMIO), I(KVM_CAP_COALESCED_PIO), I(KVM_COALESCED_MMIO_PAGE_OFFSET),
	{ 0, 0 },
};
*/
import "C"

import "unsafe"

// Values maps "struct" (size), "struct.field" (offset) and macro names
// (ioctl numbers and constants) to what the C compiler says.
func Values() map[string]uint64 {
	m := make(map[string]uint64)
	for i := 0; ; i++ {
		kv := (*C.struct_kv)(unsafe.Add(unsafe.Pointer(&C.kvs[0]), uintptr(i)*unsafe.Sizeof(C.kvs[0])))
		if kv.name == nil {
			break
		}
		m[C.GoString(kv.name)] = uint64(kv.value)
	}
	return m
}
