package kvmapi

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VCPU is a virtual CPU file descriptor and its kvm_run page.
type VCPU struct {
	fd  int
	id  int
	run runPage
	vm  *VM
	// msrBuf is MSRs' ioctl buffer (16 KiB), kept so that a checkpoint's
	// save allocates none. A VCPU is used from one thread
	// (its own), so nothing guards it.
	msrBuf *msrs
	ring   *DirtyRing // nil unless MapDirtyRing
}

// ID is the vCPU id (its APIC ID in govmm).
func (v *VCPU) ID() int { return v.id }

// Close unmaps the run page and closes the fd. It is idempotent.
func (v *VCPU) Close() error {
	if v.fd < 0 {
		return nil
	}
	err := unix.Munmap(v.run)
	if v.ring != nil {
		if rerr := v.ring.unmap(); err == nil {
			err = rerr
		}
	}
	if cerr := unix.Close(v.fd); err == nil {
		err = cerr
	}
	v.fd, v.run = -1, nil
	return err
}

// Run enters the guest until the next exit. EINTR comes back as
// ErrInterrupted; Run never re-enters on its own.
func (v *VCPU) Run() (Exit, error) {
	_, errno := ioctlVal(v.fd, kvmRun, 0)
	switch errno {
	case 0:
		return v.run.decode(), nil
	case unix.EINTR:
		return Exit{Reason: ExitIntr}, ErrInterrupted
	default:
		return Exit{}, ioctlErr("KVM_RUN", errno)
	}
}

// SyncedState reads REGS, SREGS and VCPU_EVENTS in one KVM_RUN instead
// of three ioctls (KVM API, "kvm_valid_regs" and KVM_CAP_SYNC_REGS): with
// immediate_exit set, KVM_RUN returns EINTR without entering the guest
// (any pending PIO/MMIO completed already, by the pause's own run) and,
// on its way out, stores the three into the kvm_run page with the same
// functions as KVM_GET_REGS, KVM_GET_SREGS and KVM_GET_VCPU_EVENTS. Call
// it on a paused vCPU's own thread, on a host that offers CapSyncRegs
// with these three bits (SyncX86State). It sets immediate_exit itself
// (a paused vCPU has it set already; it stays set), so the guest is never
// entered; the request for the registers is withdrawn before it returns,
// so later exits store nothing.
func (v *VCPU) SyncedState() (Regs, Sregs, VCPUEvents, error) {
	v.run.setImmediateExit(true)
	v.run.setU64(runOffDirtyRegs, 0) // never write userspace's copy back
	v.run.setU64(runOffValidRegs, SyncX86State)
	_, errno := ioctlVal(v.fd, kvmRun, 0)
	v.run.setU64(runOffValidRegs, 0)
	if errno != unix.EINTR {
		if errno == 0 {
			return Regs{}, Sregs{}, VCPUEvents{}, errors.New("KVM_RUN for the sync registers: an exit instead of EINTR")
		}
		return Regs{}, Sregs{}, VCPUEvents{}, ioctlErr("KVM_RUN", errno)
	}
	r, s, e := v.run.syncedState()
	return r, s, e, nil
}

// SetImmediateExit sets kvm_run.immediate_exit: while set, KVM_RUN returns
// EINTR at once instead of entering the guest. Safe from any thread.
func (v *VCPU) SetImmediateExit(on bool) { v.run.setImmediateExit(on) }

// Regs gets the general-purpose registers.
func (v *VCPU) Regs() (Regs, error) {
	var r Regs
	_, err := doPtr(v.fd, "KVM_GET_REGS", kvmGetRegs, unsafe.Pointer(&r))
	return r, err
}

// SetRegs sets the general-purpose registers.
func (v *VCPU) SetRegs(r Regs) error {
	_, err := doPtr(v.fd, "KVM_SET_REGS", kvmSetRegs, unsafe.Pointer(&r))
	return err
}

// Sregs gets the special registers.
func (v *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	_, err := doPtr(v.fd, "KVM_GET_SREGS", kvmGetSregs, unsafe.Pointer(&s))
	return s, err
}

// SetSregs sets the special registers.
func (v *VCPU) SetSregs(s Sregs) error {
	_, err := doPtr(v.fd, "KVM_SET_SREGS", kvmSetSregs, unsafe.Pointer(&s))
	return err
}

// FPU gets the legacy FPU/SSE state.
func (v *VCPU) FPU() (FPU, error) {
	var f FPU
	_, err := doPtr(v.fd, "KVM_GET_FPU", kvmGetFPU, unsafe.Pointer(&f))
	return f, err
}

// SetFPU sets the legacy FPU/SSE state.
func (v *VCPU) SetFPU(f FPU) error {
	_, err := doPtr(v.fd, "KVM_SET_FPU", kvmSetFPU, unsafe.Pointer(&f))
	return err
}

// Xsave gets the XSAVE area; size is KVM_CAP_XSAVE2's answer for the VM
// (0 or below XsaveSize uses the legacy KVM_GET_XSAVE).
func (v *VCPU) Xsave(size int) (Xsave, error) {
	return v.XsaveInto(nil, size)
}

// XsaveInto is Xsave into buf if it is large enough (XsaveWords(size)
// words), else into a new buffer; the Region aliases it.
func (v *VCPU) XsaveInto(buf []uint64, size int) (Xsave, error) {
	req, op := kvmGetXsave2, "KVM_GET_XSAVE2"
	if size <= XsaveSize {
		size, req, op = XsaveSize, kvmGetXsave, "KVM_GET_XSAVE"
	}
	if len(buf) < XsaveWords(size) {
		buf = make([]uint64, XsaveWords(size)) // 8-aligned for the kernel's copy
	}
	_, err := doPtr(v.fd, op, req, unsafe.Pointer(&buf[0]))
	if err != nil {
		return Xsave{}, err
	}
	return Xsave{Region: unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), size)}, nil
}

// XsaveWords is how many 8-byte words XsaveInto needs for an area of
// size bytes (KVM_CAP_XSAVE2's answer; at least XsaveSize).
func XsaveWords(size int) int { return (max(size, XsaveSize) + 7) / 8 }

// SetXsave sets the XSAVE area. KVM_SET_XSAVE reads as much as the VM's
// XSAVE2 size, so a short region is padded with zeros.
func (v *VCPU) SetXsave(x Xsave, size int) error {
	size = max(size, XsaveSize, len(x.Region))
	buf := make([]uint64, (size+7)/8)
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&buf[0])), size), x.Region)
	_, err := doPtr(v.fd, "KVM_SET_XSAVE", kvmSetXsave, unsafe.Pointer(&buf[0]))
	return err
}

// XCRs gets the extended control registers.
func (v *VCPU) XCRs() (XCRs, error) {
	var x XCRs
	_, err := doPtr(v.fd, "KVM_GET_XCRS", kvmGetXCRs, unsafe.Pointer(&x))
	return x, err
}

// SetXCRs sets the extended control registers.
func (v *VCPU) SetXCRs(x XCRs) error {
	_, err := doPtr(v.fd, "KVM_SET_XCRS", kvmSetXCRs, unsafe.Pointer(&x))
	return err
}

// maxMSRs bounds one GET/SET_MSRS call.
const maxMSRs = 1024

type msrs struct {
	N       uint32
	_       uint32
	Entries [maxMSRs]MSREntry
}

// MSRs reads the MSRs named by the entries' Index fields and fills in Data.
// KVM stops at the first MSR it cannot read; that is an error here.
func (v *VCPU) MSRs(entries []MSREntry) error {
	if len(entries) > maxMSRs {
		return errors.New("KVM_GET_MSRS: too many msrs")
	}
	m := v.msrScratch()
	m.N = uint32(len(entries))
	copy(m.Entries[:], entries)
	n, err := doPtr(v.fd, "KVM_GET_MSRS", kvmGetMSRs, unsafe.Pointer(m))
	if err != nil {
		return err
	}
	copy(entries, m.Entries[:n])
	if n != len(entries) {
		return &MSRError{Op: "KVM_GET_MSRS", Index: entries[n].Index}
	}
	return nil
}

func (v *VCPU) msrScratch() *msrs {
	if v.msrBuf == nil {
		v.msrBuf = new(msrs)
	}
	return v.msrBuf
}

// SetMSRs writes the given MSRs. KVM stops at the first it refuses; that is
// an error here.
func (v *VCPU) SetMSRs(entries []MSREntry) error {
	if len(entries) > maxMSRs {
		return errors.New("KVM_SET_MSRS: too many msrs")
	}
	m := new(msrs)
	m.N = uint32(len(entries))
	copy(m.Entries[:], entries)
	n, err := doPtr(v.fd, "KVM_SET_MSRS", kvmSetMSRs, unsafe.Pointer(m))
	if err != nil {
		return err
	}
	if n != len(entries) {
		return &MSRError{Op: "KVM_SET_MSRS", Index: entries[n].Index}
	}
	return nil
}

// MSRError names the MSR at which GET/SET_MSRS stopped.
type MSRError struct {
	Op    string
	Index uint32
}

func (e *MSRError) Error() string {
	return e.Op + ": msr " + hex32(e.Index) + " refused"
}

func hex32(x uint32) string {
	const digits = "0123456789abcdef"
	b := []byte("0x00000000")
	for i := 9; i >= 2; i-- {
		b[i] = digits[x&0xf]
		x >>= 4
	}
	return string(b)
}

// LAPIC gets the local APIC registers.
func (v *VCPU) LAPIC() (LAPICState, error) {
	var l LAPICState
	_, err := doPtr(v.fd, "KVM_GET_LAPIC", kvmGetLAPIC, unsafe.Pointer(&l))
	return l, err
}

// SetLAPIC sets the local APIC registers.
func (v *VCPU) SetLAPIC(l LAPICState) error {
	_, err := doPtr(v.fd, "KVM_SET_LAPIC", kvmSetLAPIC, unsafe.Pointer(&l))
	return err
}

// SetCPUID2 sets the CPUID leaves the guest sees.
func (v *VCPU) SetCPUID2(entries []CPUIDEntry) error {
	if len(entries) > maxCPUIDEntries {
		return errors.New("KVM_SET_CPUID2: too many entries")
	}
	type cpuid2 struct {
		Nent    uint32
		_       uint32
		Entries [maxCPUIDEntries]CPUIDEntry
	}
	c := new(cpuid2)
	c.Nent = uint32(len(entries))
	copy(c.Entries[:], entries)
	_, err := doPtr(v.fd, "KVM_SET_CPUID2", kvmSetCPUID2, unsafe.Pointer(c))
	return err
}

// MPState gets the multiprocessing state.
func (v *VCPU) MPState() (MPState, error) {
	var m MPState
	_, err := doPtr(v.fd, "KVM_GET_MP_STATE", kvmGetMPState, unsafe.Pointer(&m))
	return m, err
}

// SetMPState sets the multiprocessing state.
func (v *VCPU) SetMPState(m MPState) error {
	_, err := doPtr(v.fd, "KVM_SET_MP_STATE", kvmSetMPState, unsafe.Pointer(&m))
	return err
}

// VCPUEvents gets pending exceptions, interrupts and NMIs.
func (v *VCPU) VCPUEvents() (VCPUEvents, error) {
	var e VCPUEvents
	_, err := doPtr(v.fd, "KVM_GET_VCPU_EVENTS", kvmGetVCPUEvents, unsafe.Pointer(&e))
	return e, err
}

// SetVCPUEvents sets pending exceptions, interrupts and NMIs.
func (v *VCPU) SetVCPUEvents(e VCPUEvents) error {
	_, err := doPtr(v.fd, "KVM_SET_VCPU_EVENTS", kvmSetVCPUEvents, unsafe.Pointer(&e))
	return err
}

// DebugRegs gets the debug registers.
func (v *VCPU) DebugRegs() (DebugRegs, error) {
	var d DebugRegs
	_, err := doPtr(v.fd, "KVM_GET_DEBUGREGS", kvmGetDebugRegs, unsafe.Pointer(&d))
	return d, err
}

// SetDebugRegs sets the debug registers.
func (v *VCPU) SetDebugRegs(d DebugRegs) error {
	_, err := doPtr(v.fd, "KVM_SET_DEBUGREGS", kvmSetDebugRegs, unsafe.Pointer(&d))
	return err
}

// TSCKHz is the guest TSC frequency (KVM_GET_TSC_KHZ).
func (v *VCPU) TSCKHz() (uint32, error) {
	r, err := doVal(v.fd, "KVM_GET_TSC_KHZ", kvmGetTSCKHz, 0)
	return uint32(r), err
}

// SetTSCKHz sets the guest TSC frequency (KVM_SET_TSC_KHZ), so a restored
// guest sees the TSC rate it was calibrated against.
func (v *VCPU) SetTSCKHz(khz uint32) error {
	_, err := doVal(v.fd, "KVM_SET_TSC_KHZ", kvmSetTSCKHz, uintptr(khz))
	return err
}
