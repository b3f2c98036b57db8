package kvmapi

import "fmt"

//go:generate go run golang.org/x/tools/cmd/stringer@v0.30.0 -type=ExitReason -trimprefix=Exit

// ExitReason is kvm_run.exit_reason (KVM_EXIT_*).
type ExitReason uint32

// Exit reasons (the kernel's KVM_EXIT_* values).
const (
	ExitUnknown       ExitReason = 0
	ExitException     ExitReason = 1
	ExitIO            ExitReason = 2
	ExitHypercall     ExitReason = 3
	ExitDebug         ExitReason = 4
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitIRQWindowOpen ExitReason = 7
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitSetTPR        ExitReason = 11
	ExitTPRAccess     ExitReason = 12
	ExitNMI           ExitReason = 16
	ExitInternalError ExitReason = 17
	ExitSystemEvent   ExitReason = 24
	ExitIOAPICEOI     ExitReason = 26
	ExitX86RDMSR      ExitReason = 29
	ExitX86WRMSR      ExitReason = 30
	ExitDirtyRingFull ExitReason = 31
	ExitX86BusLock    ExitReason = 33
	ExitNotify        ExitReason = 37
	ExitMemoryFault   ExitReason = 39
)

// NumExitReasons bounds the exit reasons, for per-reason counters.
const NumExitReasons = 64

// System event types (kvm_run.system_event.type).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// Exit is one decoded KVM_RUN exit. Data slices point into the vCPU's
// kvm_run page and are valid only until the next Run; for an IO-in or an
// MMIO read, the caller fills Data and the next Run hands it to the guest.
type Exit struct {
	Reason ExitReason
	IO     IOExit     // valid when Reason == ExitIO
	MMIO   MMIOExit   // valid when Reason == ExitMMIO
	Fail   FailExit   // valid when Reason == ExitFailEntry
	Intern InternExit // valid when Reason == ExitInternalError
	Event  EventExit  // valid when Reason == ExitSystemEvent
}

// IOExit is a port I/O access. Rep string I/O (ins/outs) is Count elements
// of Size bytes, laid out one after another in Data.
type IOExit struct {
	Port        uint16
	In          bool
	Size, Count int
	Data        []byte // Size*Count bytes
}

// MMIOExit is an access to guest-physical memory that no slot backs.
type MMIOExit struct {
	Addr  uint64
	Write bool
	Data  []byte // Len bytes (1, 2, 4 or 8)
}

// FailExit is KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest.
type FailExit struct {
	HardwareReason uint64
	CPU            uint32
}

// InternExit is KVM_EXIT_INTERNAL_ERROR.
type InternExit struct {
	Suberror uint32
	Data     []uint64
}

// EventExit is KVM_EXIT_SYSTEM_EVENT.
type EventExit struct {
	Type uint32
	Data []uint64
}

func (e Exit) String() string {
	switch e.Reason {
	case ExitIO:
		dir := "out"
		if e.IO.In {
			dir = "in"
		}
		return fmt.Sprintf("io %s port=%#x size=%d count=%d", dir, e.IO.Port, e.IO.Size, e.IO.Count)
	case ExitMMIO:
		dir := "read"
		if e.MMIO.Write {
			dir = "write"
		}
		return fmt.Sprintf("mmio %s addr=%#x len=%d", dir, e.MMIO.Addr, len(e.MMIO.Data))
	case ExitFailEntry:
		return fmt.Sprintf("fail_entry hardware_reason=%#x cpu=%d", e.Fail.HardwareReason, e.Fail.CPU)
	case ExitInternalError:
		return fmt.Sprintf("internal_error suberror=%d data=%#x", e.Intern.Suberror, e.Intern.Data)
	case ExitSystemEvent:
		return fmt.Sprintf("system_event type=%d data=%#x", e.Event.Type, e.Event.Data)
	}
	return e.Reason.String()
}
