//go:build cgo

package kvmapi

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/kvmapi/internal/kabi"
)

// TestABI pins every Go mirror of a kernel struct, and every ioctl number,
// to what the C compiler computes from <linux/kvm.h>.
func TestABI(t *testing.T) {
	k := kabi.Values()
	var (
		seg   Segment
		sregs Sregs
		fpu   FPU
		xcrs  XCRs
		ev    VCPUEvents
		dr    DebugRegs
		chip  IRQChip
		pitc  PITChannelState
		pit   PITState2
		clk   ClockData
		cpuid CPUIDEntry
		umr   UserMemoryRegion
		dl    dirtyLog
		cdl   clearDirtyLog
		iefd  ioeventfd
		msi   MSI
		ecap  enableCap
		regs  Regs
		msr   MSREntry
	)
	want := map[string]uintptr{
		"kvm_regs":                    unsafe.Sizeof(regs),
		"kvm_segment":                 unsafe.Sizeof(seg),
		"kvm_dtable":                  unsafe.Sizeof(DTable{}),
		"kvm_sregs":                   unsafe.Sizeof(sregs),
		"kvm_fpu":                     unsafe.Sizeof(fpu),
		"kvm_xsave":                   XsaveSize,
		"kvm_xcrs":                    unsafe.Sizeof(xcrs),
		"kvm_xcr":                     unsafe.Sizeof(XCR{}),
		"kvm_msr_entry":               unsafe.Sizeof(msr),
		"kvm_msrs":                    8,
		"kvm_msr_list":                4,
		"kvm_lapic_state":             unsafe.Sizeof(LAPICState{}),
		"kvm_vcpu_events":             unsafe.Sizeof(ev),
		"kvm_mp_state":                unsafe.Sizeof(MPState{}),
		"kvm_debugregs":               unsafe.Sizeof(dr),
		"kvm_irqchip":                 unsafe.Sizeof(chip),
		"kvm_pit_channel_state":       unsafe.Sizeof(pitc),
		"kvm_pit_state2":              unsafe.Sizeof(pit),
		"kvm_pit_config":              unsafe.Sizeof(PITConfig{}),
		"kvm_clock_data":              unsafe.Sizeof(clk),
		"kvm_cpuid_entry2":            unsafe.Sizeof(cpuid),
		"kvm_cpuid2":                  8,
		"kvm_userspace_memory_region": unsafe.Sizeof(umr),
		"kvm_dirty_log":               unsafe.Sizeof(dl),
		"kvm_clear_dirty_log":         unsafe.Sizeof(cdl),
		"kvm_irq_level":               unsafe.Sizeof(irqLevel{}),
		"kvm_ioeventfd":               unsafe.Sizeof(iefd),
		"kvm_msi":                     unsafe.Sizeof(msi),
		"kvm_enable_cap":              unsafe.Sizeof(ecap),
		"kvm_msr_filter":              unsafe.Sizeof(msrFilter{}),
		"kvm_msr_filter_range":        unsafe.Sizeof(msrFilterRange{}),
		"kvm_stats_header":            unsafe.Sizeof(statsHeader{}),
		"kvm_stats_desc":              unsafe.Sizeof(statsDesc{}),
		"kvm_dirty_gfn":               unsafe.Sizeof(DirtyGFN{}),

		"kvm_regs.rip":                                unsafe.Offsetof(regs.RIP),
		"kvm_regs.rflags":                             unsafe.Offsetof(regs.RFLAGS),
		"kvm_segment.selector":                        unsafe.Offsetof(seg.Selector),
		"kvm_segment.type":                            unsafe.Offsetof(seg.Type),
		"kvm_segment.unusable":                        unsafe.Offsetof(seg.Unusable),
		"kvm_dtable.limit":                            unsafe.Offsetof(DTable{}.Limit),
		"kvm_sregs.tr":                                unsafe.Offsetof(sregs.TR),
		"kvm_sregs.ldt":                               unsafe.Offsetof(sregs.LDT),
		"kvm_sregs.gdt":                               unsafe.Offsetof(sregs.GDT),
		"kvm_sregs.idt":                               unsafe.Offsetof(sregs.IDT),
		"kvm_sregs.cr0":                               unsafe.Offsetof(sregs.CR0),
		"kvm_sregs.efer":                              unsafe.Offsetof(sregs.EFER),
		"kvm_sregs.apic_base":                         unsafe.Offsetof(sregs.APICBase),
		"kvm_sregs.interrupt_bitmap":                  unsafe.Offsetof(sregs.InterruptBitmap),
		"kvm_fpu.fcw":                                 unsafe.Offsetof(fpu.FCW),
		"kvm_fpu.ftwx":                                unsafe.Offsetof(fpu.FTWX),
		"kvm_fpu.last_opcode":                         unsafe.Offsetof(fpu.LastOpcode),
		"kvm_fpu.last_ip":                             unsafe.Offsetof(fpu.LastIP),
		"kvm_fpu.xmm":                                 unsafe.Offsetof(fpu.XMM),
		"kvm_fpu.mxcsr":                               unsafe.Offsetof(fpu.MXCSR),
		"kvm_xcrs.xcrs":                               unsafe.Offsetof(xcrs.XCRs),
		"kvm_xcr.value":                               unsafe.Offsetof(XCR{}.Value),
		"kvm_msr_entry.data":                          unsafe.Offsetof(msr.Data),
		"kvm_msrs.entries":                            8,
		"kvm_vcpu_events.interrupt":                   unsafe.Offsetof(ev.Interrupt),
		"kvm_vcpu_events.nmi":                         unsafe.Offsetof(ev.NMI),
		"kvm_vcpu_events.sipi_vector":                 unsafe.Offsetof(ev.SIPIVector),
		"kvm_vcpu_events.flags":                       unsafe.Offsetof(ev.Flags),
		"kvm_vcpu_events.smi":                         unsafe.Offsetof(ev.SMI),
		"kvm_vcpu_events.triple_fault":                unsafe.Offsetof(ev.TripleFault),
		"kvm_vcpu_events.exception_has_payload":       unsafe.Offsetof(ev.ExceptionHasPayload),
		"kvm_vcpu_events.exception_payload":           unsafe.Offsetof(ev.ExceptionPayload),
		"kvm_debugregs.dr6":                           unsafe.Offsetof(dr.DR6),
		"kvm_debugregs.dr7":                           unsafe.Offsetof(dr.DR7),
		"kvm_debugregs.flags":                         unsafe.Offsetof(dr.Flags),
		"kvm_irqchip.chip":                            unsafe.Offsetof(chip.Chip),
		"kvm_pit_channel_state.latched_count":         unsafe.Offsetof(pitc.LatchedCount),
		"kvm_pit_channel_state.status":                unsafe.Offsetof(pitc.Status),
		"kvm_pit_channel_state.gate":                  unsafe.Offsetof(pitc.Gate),
		"kvm_pit_channel_state.count_load_time":       unsafe.Offsetof(pitc.CountLoadTime),
		"kvm_pit_state2.flags":                        unsafe.Offsetof(pit.Flags),
		"kvm_clock_data.flags":                        unsafe.Offsetof(clk.Flags),
		"kvm_clock_data.realtime":                     unsafe.Offsetof(clk.Realtime),
		"kvm_clock_data.host_tsc":                     unsafe.Offsetof(clk.HostTSC),
		"kvm_cpuid_entry2.eax":                        unsafe.Offsetof(cpuid.EAX),
		"kvm_cpuid_entry2.edx":                        unsafe.Offsetof(cpuid.EDX),
		"kvm_cpuid2.entries":                          8,
		"kvm_userspace_memory_region.guest_phys_addr": unsafe.Offsetof(umr.GuestPhysAddr),
		"kvm_userspace_memory_region.userspace_addr":  unsafe.Offsetof(umr.UserspaceAddr),
		"kvm_dirty_log.dirty_bitmap":                  unsafe.Offsetof(dl.Bitmap),
		"kvm_clear_dirty_log.first_page":              unsafe.Offsetof(cdl.FirstPage),
		"kvm_clear_dirty_log.dirty_bitmap":            unsafe.Offsetof(cdl.Bitmap),
		"kvm_ioeventfd.len":                           unsafe.Offsetof(iefd.Len),
		"kvm_ioeventfd.fd":                            unsafe.Offsetof(iefd.FD),
		"kvm_ioeventfd.flags":                         unsafe.Offsetof(iefd.Flags),
		"kvm_msi.devid":                               unsafe.Offsetof(msi.DevID),
		"kvm_enable_cap.args":                         unsafe.Offsetof(ecap.Args),
		"kvm_msr_filter.ranges":                       unsafe.Offsetof(msrFilter{}.Ranges),
		"kvm_msr_filter_range.base":                   unsafe.Offsetof(msrFilterRange{}.Base),
		"kvm_msr_filter_range.bitmap":                 unsafe.Offsetof(msrFilterRange{}.Bitmap),
		"kvm_stats_header.data_offset":                unsafe.Offsetof(statsHeader{}.DataOffset),
		"kvm_stats_desc.offset":                       unsafe.Offsetof(statsDesc{}.Offset),
		"kvm_stats_desc.bucket_size":                  unsafe.Offsetof(statsDesc{}.BucketSize),
		"kvm_stats_desc.name":                         unsafe.Sizeof(statsDesc{}),
		"kvm_coalesced_mmio_zone":                     unsafe.Sizeof(coalescedZone{}),
		"kvm_coalesced_mmio_zone.size":                unsafe.Offsetof(coalescedZone{}.Size),
		"kvm_coalesced_mmio_zone.pio":                 unsafe.Offsetof(coalescedZone{}.PIO),
		"kvm_coalesced_mmio":                          unsafe.Sizeof(CoalescedIO{}),
		"kvm_coalesced_mmio.len":                      unsafe.Offsetof(CoalescedIO{}.Len),
		"kvm_coalesced_mmio.pio":                      unsafe.Offsetof(CoalescedIO{}.PIO),
		"kvm_coalesced_mmio.data":                     unsafe.Offsetof(CoalescedIO{}.Data),
		"kvm_coalesced_mmio_ring":                     unsafe.Sizeof(coalescedRingHeader{}),
		"kvm_coalesced_mmio_ring.last":                unsafe.Offsetof(coalescedRingHeader{}.Last),
		"kvm_coalesced_mmio_ring.coalesced_mmio":      unsafe.Sizeof(coalescedRingHeader{}),
		"kvm_dirty_gfn.slot":                          unsafe.Offsetof(DirtyGFN{}.Slot),
		"kvm_dirty_gfn.offset":                        unsafe.Offsetof(DirtyGFN{}.Offset),

		// kvm_run: decode reads these offsets directly (run_unsafe.go).
		"kvm_run.immediate_exit":     runOffImmediateExit,
		"kvm_run.exit_reason":        runOffExitReason,
		"kvm_run.io":                 runOffUnion,
		"kvm_run.mmio":               runOffUnion,
		"kvm_run.io.size":            runOffUnion + 1,
		"kvm_run.io.port":            runOffUnion + 2,
		"kvm_run.io.count":           runOffUnion + 4,
		"kvm_run.io.data_offset":     runOffUnion + 8,
		"kvm_run.mmio.data":          runOffUnion + 8,
		"kvm_run.mmio.len":           runOffUnion + 16,
		"kvm_run.mmio.is_write":      runOffUnion + 20,
		"kvm_run.fail_entry.cpu":     runOffUnion + 8,
		"kvm_run.internal.ndata":     runOffUnion + 4,
		"kvm_run.internal.data":      runOffUnion + 8,
		"kvm_run.system_event.ndata": runOffUnion + 4,
		"kvm_run.system_event.data":  runOffUnion + 8,
		"kvm_run.kvm_valid_regs":     runOffValidRegs,
		"kvm_run.kvm_dirty_regs":     runOffDirtyRegs,
		"kvm_run.s.regs.regs":        runOffSyncRegs,
		"kvm_run.s.regs.sregs":       runOffSyncSregs,
		"kvm_run.s.regs.events":      runOffSyncEvents,
	}
	for name, w := range want {
		got, ok := k[name]
		require.True(t, ok, "kabi has no %s", name)
		assert.Equal(t, uint64(got), uint64(w), name)
	}
	// The irqchip union is the larger of the PIC and IOAPIC states.
	assert.LessOrEqual(t, k["kvm_pic_state"], uint64(len(chip.Chip)))
	assert.LessOrEqual(t, k["kvm_ioapic_state"], uint64(len(chip.Chip)))
	assert.LessOrEqual(t, k["kvm_run"], uint64(4096), "kvm_run fits a page")

	ioctls := map[string]uintptr{
		"KVM_GET_API_VERSION": kvmGetAPIVersion, "KVM_CREATE_VM": kvmCreateVM,
		"KVM_GET_MSR_INDEX_LIST": kvmGetMSRIndexList, "KVM_CHECK_EXTENSION": kvmCheckExtension,
		"KVM_GET_VCPU_MMAP_SIZE": kvmGetVCPUMmapSize, "KVM_GET_SUPPORTED_CPUID": kvmGetSupportedCPUID,
		"KVM_CREATE_VCPU": kvmCreateVCPU, "KVM_GET_DIRTY_LOG": kvmGetDirtyLog,
		"KVM_SET_USER_MEMORY_REGION": kvmSetUserMemoryRegion, "KVM_SET_TSS_ADDR": kvmSetTSSAddr,
		"KVM_SET_IDENTITY_MAP_ADDR": kvmSetIdentityMapAddr, "KVM_CREATE_IRQCHIP": kvmCreateIRQChip,
		"KVM_IRQ_LINE": kvmIRQLine, "KVM_GET_IRQCHIP": kvmGetIRQChip, "KVM_SET_IRQCHIP": kvmSetIRQChip,
		"KVM_CREATE_PIT2": kvmCreatePIT2, "KVM_IOEVENTFD": kvmIOEventFD,
		"KVM_SET_CLOCK": kvmSetClock, "KVM_GET_CLOCK": kvmGetClock,
		"KVM_GET_PIT2": kvmGetPIT2, "KVM_SET_PIT2": kvmSetPIT2, "KVM_ENABLE_CAP": kvmEnableCap,
		"KVM_SIGNAL_MSI": kvmSignalMSI, "KVM_CLEAR_DIRTY_LOG": kvmClearDirtyLog,
		"KVM_RUN": kvmRun, "KVM_GET_REGS": kvmGetRegs, "KVM_SET_REGS": kvmSetRegs,
		"KVM_GET_SREGS": kvmGetSregs, "KVM_SET_SREGS": kvmSetSregs, "KVM_GET_MSRS": kvmGetMSRs,
		"KVM_SET_MSRS": kvmSetMSRs, "KVM_GET_FPU": kvmGetFPU, "KVM_SET_FPU": kvmSetFPU,
		"KVM_GET_LAPIC": kvmGetLAPIC, "KVM_SET_LAPIC": kvmSetLAPIC, "KVM_SET_CPUID2": kvmSetCPUID2,
		"KVM_GET_MP_STATE": kvmGetMPState, "KVM_SET_MP_STATE": kvmSetMPState,
		"KVM_GET_VCPU_EVENTS": kvmGetVCPUEvents, "KVM_SET_VCPU_EVENTS": kvmSetVCPUEvents,
		"KVM_GET_DEBUGREGS": kvmGetDebugRegs, "KVM_SET_DEBUGREGS": kvmSetDebugRegs,
		"KVM_GET_XSAVE": kvmGetXsave, "KVM_SET_XSAVE": kvmSetXsave, "KVM_GET_XCRS": kvmGetXCRs,
		"KVM_SET_XCRS": kvmSetXCRs, "KVM_GET_TSC_KHZ": kvmGetTSCKHz, "KVM_SET_TSC_KHZ": kvmSetTSCKHz, "KVM_GET_XSAVE2": kvmGetXsave2,
		"KVM_X86_SET_MSR_FILTER": kvmX86SetMSRFilter, "KVM_GET_STATS_FD": kvmGetStatsFD,
		"KVM_RESET_DIRTY_RINGS": kvmResetDirtyRings, "KVM_REGISTER_COALESCED_MMIO": kvmRegisterCoalesced,
	}
	for name, w := range ioctls {
		got, ok := k[name]
		require.True(t, ok, "kabi has no %s", name)
		assert.Equal(t, got, uint64(w), "%s: got %#x want %#x", name, w, got)
	}

	consts := map[string]uint64{
		"KVM_EXIT_IO": uint64(ExitIO), "KVM_EXIT_MMIO": uint64(ExitMMIO),
		"KVM_EXIT_SHUTDOWN": uint64(ExitShutdown), "KVM_EXIT_FAIL_ENTRY": uint64(ExitFailEntry),
		"KVM_EXIT_INTERNAL_ERROR": uint64(ExitInternalError), "KVM_EXIT_SYSTEM_EVENT": uint64(ExitSystemEvent),
		"KVM_EXIT_HLT": uint64(ExitHLT), "KVM_EXIT_INTR": uint64(ExitIntr),
		"KVM_EXIT_IO_IN": 0, "KVM_EXIT_IO_OUT": 1,
		"KVM_MEM_LOG_DIRTY_PAGES": MemLogDirtyPages,
		"KVM_CAP_XSAVE2":          CapXsave2, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": CapManualDirtyLogProtect2,
		"KVM_CAP_IMMEDIATE_EXIT": CapImmediateExit, "KVM_CAP_IOEVENTFD": CapIOEventFD, "KVM_CAP_SIGNAL_MSI": CapSignalMSI,
		"KVM_CLOCK_TSC_STABLE": ClockTSCStable, "KVM_CLOCK_REALTIME": ClockRealtime,
		"KVM_CLOCK_HOST_TSC":     ClockHostTSC,
		"KVM_CAP_X86_MSR_FILTER": CapX86MSRFilter, "KVM_CAP_PMU_CAPABILITY": CapPMUCapability,
		"KVM_PMU_CAP_DISABLE":          PMUCapDisable,
		"KVM_MSR_FILTER_DEFAULT_ALLOW": MSRFilterDefaultAllow, "KVM_MSR_FILTER_DEFAULT_DENY": MSRFilterDefaultDeny,
		"KVM_MSR_FILTER_READ": MSRFilterRead, "KVM_MSR_FILTER_WRITE": MSRFilterWrite,
		"KVM_CAP_TSC_CONTROL": CapTSCControl, "KVM_CAP_TSC_DEADLINE_TIMER": CapTSCDeadlineTimer,
		"KVM_CAP_DIRTY_LOG_RING": CapDirtyLogRing, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": CapDirtyLogRingAcqRel,
		"KVM_DIRTY_LOG_PAGE_OFFSET": DirtyLogPageOffset, "KVM_EXIT_DIRTY_RING_FULL": uint64(ExitDirtyRingFull),
		"KVM_DIRTY_GFN_F_DIRTY": dirtyGFNDirty, "KVM_DIRTY_GFN_F_RESET": dirtyGFNReset,
		"KVM_CAP_SYNC_REGS": CapSyncRegs, "KVM_SYNC_X86_REGS": syncX86Regs, "KVM_SYNC_X86_SREGS": syncX86Sregs,
		"KVM_SYNC_X86_EVENTS":    syncX86Events,
		"KVM_CAP_COALESCED_MMIO": CapCoalescedMMIO, "KVM_CAP_COALESCED_PIO": CapCoalescedPIO,
		"KVM_COALESCED_MMIO_PAGE_OFFSET": coalescedPageOffset,
	}
	for name, w := range consts {
		assert.Equal(t, k[name], w, name)
	}
}
