package kvmapi

import (
	"unsafe"
)

// Offsets inside struct kvm_run (pinned by TestABI).
const (
	runOffImmediateExit = 1
	runOffExitReason    = 8
	runOffUnion         = 32
	runSizeUnion        = 256
	// kvm_valid_regs, kvm_dirty_regs and the sync area s.regs, a struct
	// kvm_sync_regs (x86: kvm_regs, kvm_sregs, kvm_vcpu_events).
	runOffValidRegs  = 288
	runOffDirtyRegs  = 296
	runOffSyncRegs   = 304
	runOffSyncSregs  = runOffSyncRegs + unsafe.Sizeof(Regs{})
	runOffSyncEvents = runOffSyncSregs + unsafe.Sizeof(Sregs{})
)

// KVM_SYNC_X86_* bits of kvm_valid_regs (KVM API, "kvm_valid_regs").
const (
	syncX86Regs   = 1 << 0
	syncX86Sregs  = 1 << 1
	syncX86Events = 1 << 2
	// SyncX86State is the bits SyncedState asks for: CapSyncRegs must
	// report all of them.
	SyncX86State = syncX86Regs | syncX86Sregs | syncX86Events
)

func (r runPage) setU64(off int, v uint64) {
	// Sound: as u64; only this vCPU's thread writes these fields, and only
	// while KVM_RUN is not in progress.
	*(*uint64)(unsafe.Pointer(&r[off])) = v
}

// syncedState copies the sync area's registers, sregs and events out of
// the page. Sound: the three are the kernel's structs, whose Go
// counterparts are pinned to them by the ABI test, at offsets the test
// pins too; the page is page-aligned and each offset 8-aligned.
func (r runPage) syncedState() (Regs, Sregs, VCPUEvents) {
	return *(*Regs)(unsafe.Pointer(&r[runOffSyncRegs])),
		*(*Sregs)(unsafe.Pointer(&r[runOffSyncSregs])),
		*(*VCPUEvents)(unsafe.Pointer(&r[runOffSyncEvents]))
}

// runPage is the mmap'ed struct kvm_run of one vCPU. It is shared with the
// kernel; only the vCPU's own thread reads or writes it while KVM_RUN is not
// in progress, except immediate_exit, which a kicker may set at any time
// (the kernel reads it once on entry).
type runPage []byte

func (r runPage) u32(off int) uint32 {
	// Sound: off is a constant inside the mmap'ed page and 4-aligned; the
	// page is page-aligned, so the load is aligned.
	return *(*uint32)(unsafe.Pointer(&r[off]))
}

func (r runPage) u64(off int) uint64 {
	// Sound: as u32, with 8-aligned offsets.
	return *(*uint64)(unsafe.Pointer(&r[off]))
}

func (r runPage) setImmediateExit(v bool) {
	var b uint8
	if v {
		b = 1
	}
	// Sound: a single byte store; the kernel reads the byte with READ_ONCE.
	*(*uint8)(unsafe.Pointer(&r[runOffImmediateExit])) = b
}

// decode turns the page after a KVM_RUN into an Exit.
func (r runPage) decode() Exit {
	ex := Exit{Reason: ExitReason(r.u32(runOffExitReason))}
	u := runOffUnion
	switch ex.Reason {
	case ExitIO:
		// struct { __u8 direction, size; __u16 port; __u32 count; __u64 data_offset; }
		size := int(r[u+1])
		count := int(r.u32(u + 4))
		off := r.u64(u + 8)
		ex.IO = IOExit{
			In:    r[u] == 0, // KVM_EXIT_IO_IN
			Size:  size,
			Port:  uint16(r[u+2]) | uint16(r[u+3])<<8,
			Count: count,
		}
		n := uint64(size) * uint64(count)
		if off <= uint64(len(r)) && n <= uint64(len(r))-off {
			ex.IO.Data = r[off : off+n : off+n]
		}
	case ExitMMIO:
		// struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; }
		n := r.u32(u + 16)
		if n > 8 {
			n = 8
		}
		ex.MMIO = MMIOExit{
			Addr:  r.u64(u),
			Data:  r[u+8 : u+8+int(n) : u+8+int(n)],
			Write: r[u+20] != 0,
		}
	case ExitFailEntry:
		ex.Fail = FailExit{HardwareReason: r.u64(u), CPU: r.u32(u + 8)}
	case ExitInternalError:
		ex.Intern = InternExit{Suberror: r.u32(u), Data: r.u64s(u+8, r.u32(u+4))}
	case ExitSystemEvent:
		ex.Event = EventExit{Type: r.u32(u), Data: r.u64s(u+8, r.u32(u+4))}
	}
	return ex
}

func (r runPage) u64s(off int, n uint32) []uint64 {
	if n > 16 {
		n = 16
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = r.u64(off + 8*i)
	}
	return out
}
