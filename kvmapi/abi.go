package kvmapi

// The structs below mirror the kernel's x86-64 KVM ABI field for field, with
// explicit padding; TestABI pins each size and key offset to <linux/kvm.h>.
// They are plain values: copying them is cheap and safe.

// Regs is struct kvm_regs (KVM_GET_REGS/KVM_SET_REGS).
type Regs struct {
	RAX, RBX, RCX, RDX uint64
	RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11   uint64
	R12, R13, R14, R15 uint64
	RIP, RFLAGS        uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	Base                           uint64
	Limit                          uint32
	Selector                       uint16
	Type                           uint8
	Present, DPL, DB, S, L, G, AVL uint8
	Unusable                       uint8
	_                              uint8
}

// DTable is struct kvm_dtable (GDTR/IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs (KVM_GET_SREGS/KVM_SET_SREGS).
type Sregs struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	InterruptBitmap         [4]uint64
}

// FPU is struct kvm_fpu (KVM_GET_FPU/KVM_SET_FPU).
type FPU struct {
	FPR        [8][16]uint8
	FCW, FSW   uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// XsaveSize is the size of the legacy struct kvm_xsave. KVM_GET_XSAVE2 may
// need more (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) says how much).
const XsaveSize = 4096

// Xsave is the XSAVE area (struct kvm_xsave), possibly longer than
// XsaveSize when the host has large state components.
type Xsave struct {
	Region []byte
}

// XCR is one entry of struct kvm_xcrs.
type XCR struct {
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs (KVM_GET_XCRS/KVM_SET_XCRS).
type XCRs struct {
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// MSREntry is struct kvm_msr_entry.
type MSREntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// LAPICState is struct kvm_lapic_state: the local APIC's register page.
type LAPICState struct {
	Regs [1024]byte
}

// VCPUEvents is struct kvm_vcpu_events: pending and injected exceptions,
// interrupts, NMIs and SMIs.
type VCPUEvents struct {
	Exception struct {
		Injected, Nr, HasErrorCode, Pending uint8
		ErrorCode                           uint32
	}
	Interrupt struct {
		Injected, Nr, Soft, Shadow uint8
	}
	NMI struct {
		Injected, Pending, Masked, _ uint8
	}
	SIPIVector uint32
	Flags      uint32
	SMI        struct {
		SMM, Pending, SMMInsideNMI, LatchedInit uint8
	}
	TripleFault struct {
		Pending uint8
	}
	_                   [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// MPState is struct kvm_mp_state.
type MPState struct {
	State uint32
}

// MP states (KVM_GET_MP_STATE).
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSipiReceived  = 4
)

// DebugRegs is struct kvm_debugregs.
type DebugRegs struct {
	DB    [4]uint64
	DR6   uint64
	DR7   uint64
	Flags uint64
	_     [9]uint64
}

// IRQChip is struct kvm_irqchip: one of the in-kernel PICs or the IOAPIC.
// Chip holds the kernel's kvm_pic_state or kvm_ioapic_state bytes.
type IRQChip struct {
	ChipID uint32
	_      uint32
	Chip   [512]byte
}

// Chip IDs for IRQChip.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// PITChannelState is struct kvm_pit_channel_state.
type PITChannelState struct {
	Count                       uint32
	LatchedCount                uint16
	CountLatched, StatusLatched uint8
	Status                      uint8
	ReadState, WriteState       uint8
	WriteLatch                  uint8
	RWMode, Mode, BCD, Gate     uint8
	CountLoadTime               int64
}

// PITState2 is struct kvm_pit_state2.
type PITState2 struct {
	Channels [3]PITChannelState
	Flags    uint32
	_        [9]uint32
}

// PITConfig is struct kvm_pit_config.
type PITConfig struct {
	Flags uint32
	_     [15]uint32
}

// PITSpeakerDummy asks KVM_CREATE_PIT2 to emulate a dummy speaker port (0x61).
const PITSpeakerDummy = 1

// ClockData is struct kvm_clock_data (KVM_GET_CLOCK/KVM_SET_CLOCK).
type ClockData struct {
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// ClockData flags.
const (
	ClockTSCStable = 2
	ClockRealtime  = 1 << 2
	ClockHostTSC   = 1 << 3
)

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function, Index, Flags uint32
	EAX, EBX, ECX, EDX     uint32
	_                      [3]uint32
}

// CPUIDFlagSignificantIndex marks a leaf whose sub-leaf (Index) matters.
const CPUIDFlagSignificantIndex = 1

// UserMemoryRegion is struct kvm_userspace_memory_region.
type UserMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// Memory region flags.
const (
	MemLogDirtyPages = 1 << 0
	MemReadOnly      = 1 << 1
)

// dirtyLog is struct kvm_dirty_log.
type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64 // userspace pointer
}

// clearDirtyLog is struct kvm_clear_dirty_log.
type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64 // userspace pointer
}

// irqLevel is struct kvm_irq_level.
type irqLevel struct {
	IRQ   uint32
	Level uint32
}

// ioeventfd is struct kvm_ioeventfd.
type ioeventfd struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

// ioeventfd flags.
const (
	ioeventfdFlagDatamatch = 1 << 0
	ioeventfdFlagPIO       = 1 << 1
	ioeventfdFlagDeassign  = 1 << 2
)

// MSI is struct kvm_msi (KVM_SIGNAL_MSI).
type MSI struct {
	AddressLo uint32
	AddressHi uint32
	Data      uint32
	Flags     uint32
	DevID     uint32
	_         [12]uint8
}

// enableCap is struct kvm_enable_cap.
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}

// Capabilities (KVM_CHECK_EXTENSION) used by govmm.
const (
	CapIRQChip                = 0
	CapUserMemory             = 3
	CapSetTSSAddr             = 4
	CapExtCPUID               = 7
	CapPIT2                   = 33
	CapIOEventFD              = 36
	CapTSCControl             = 60
	CapMaxVCPUs               = 66
	CapTSCDeadlineTimer       = 72
	CapSignalMSI              = 77
	CapSyncRegs               = 74
	CapImmediateExit          = 136
	CapManualDirtyLogProtect2 = 168
	CapX86MSRFilter           = 189
	CapXsave2                 = 208
	CapPMUCapability          = 212
	CapDirtyLogRing           = 192
	CapCoalescedMMIO          = 15 // its value is the ring's page offset in the vCPU's mapping
	CapCoalescedPIO           = 162
	CapDirtyLogRingAcqRel     = 223
)

// DirtyGFN is struct kvm_dirty_gfn: one entry of a vCPU's dirty ring, a
// page (Offset, in pages from the start of memory slot Slot) that the vCPU
// dirtied.
type DirtyGFN struct {
	Flags  uint32
	Slot   uint32
	Offset uint64
}

// DirtyGFN flags: KVM publishes an entry with dirtyGFNDirty, the VMM hands
// it back with dirtyGFNReset, and KVM_RESET_DIRTY_RINGS clears it.
const (
	dirtyGFNDirty = 1 << 0
	dirtyGFNReset = 1 << 1
)

// coalescedZone is struct kvm_coalesced_mmio_zone: a range of MMIO
// addresses or, with PIO set, I/O ports whose writes KVM queues in the
// coalesced ring instead of exiting.
type coalescedZone struct {
	Addr uint64
	Size uint32
	PIO  uint32
}

// CoalescedIO is struct kvm_coalesced_mmio: one write KVM queued in the
// coalesced ring (PIO 1: to an I/O port).
type CoalescedIO struct {
	Addr uint64
	Len  uint32
	PIO  uint32
	Data [8]byte
}

// coalescedRingHeader is the head of struct kvm_coalesced_mmio_ring:
// KVM appends at Last, the VMM takes from First; the entries follow.
type coalescedRingHeader struct {
	First, Last uint32
}

// DirtyLogPageOffset is where, in pages, a vCPU's dirty ring sits in the
// vCPU fd's mmap space (KVM_DIRTY_LOG_PAGE_OFFSET on x86).
const DirtyLogPageOffset = 64
