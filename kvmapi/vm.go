package kvmapi

import (
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a virtual machine file descriptor.
type VM struct {
	fd      int
	sys     *System
	runSize int
}

// Close closes the VM fd. It is idempotent.
func (vm *VM) Close() error {
	if vm.fd < 0 {
		return nil
	}
	err := unix.Close(vm.fd)
	vm.fd = -1
	return err
}

// FD returns the raw descriptor (for diagnostics only).
func (vm *VM) FD() int { return vm.fd }

// CheckExtension asks the VM (rather than the system) about cap; some
// answers (e.g. KVM_CAP_XSAVE2) are per VM.
func (vm *VM) CheckExtension(cap int) int {
	r, errno := ioctlVal(vm.fd, kvmCheckExtension, uintptr(cap))
	if errno != 0 {
		return 0
	}
	return int(r)
}

// SetUserMemoryRegion creates, changes or (with MemorySize 0) deletes a
// memory slot.
func (vm *VM) SetUserMemoryRegion(r UserMemoryRegion) error {
	_, err := doPtr(vm.fd, "KVM_SET_USER_MEMORY_REGION", kvmSetUserMemoryRegion, unsafe.Pointer(&r))
	return err
}

// SetTSSAddr places the three pages KVM needs for real-mode emulation on
// Intel (KVM_SET_TSS_ADDR). It must not overlap guest memory or devices.
func (vm *VM) SetTSSAddr(addr uint64) error {
	_, err := doVal(vm.fd, "KVM_SET_TSS_ADDR", kvmSetTSSAddr, uintptr(addr))
	return err
}

// SetIdentityMapAddr places the identity-map page (KVM_SET_IDENTITY_MAP_ADDR).
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	_, err := doPtr(vm.fd, "KVM_SET_IDENTITY_MAP_ADDR", kvmSetIdentityMapAddr, unsafe.Pointer(&addr))
	return err
}

// CreateIRQChip creates the in-kernel PICs, IOAPIC and local APICs.
func (vm *VM) CreateIRQChip() error {
	_, err := doVal(vm.fd, "KVM_CREATE_IRQCHIP", kvmCreateIRQChip, 0)
	return err
}

// CreatePIT2 creates the in-kernel i8254 timer.
func (vm *VM) CreatePIT2(flags uint32) error {
	c := PITConfig{Flags: flags}
	_, err := doPtr(vm.fd, "KVM_CREATE_PIT2", kvmCreatePIT2, unsafe.Pointer(&c))
	return err
}

// IRQLine sets the level of an interrupt line of the in-kernel irqchip.
// An edge is two calls: level 1 then level 0.
func (vm *VM) IRQLine(irq uint32, level bool) error {
	l := irqLevel{IRQ: irq}
	if level {
		l.Level = 1
	}
	_, err := doPtr(vm.fd, "KVM_IRQ_LINE", kvmIRQLine, unsafe.Pointer(&l))
	return err
}

// SignalMSI injects one MSI message.
func (vm *VM) SignalMSI(addr uint64, data uint32) error {
	m := MSI{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	_, err := doPtr(vm.fd, "KVM_SIGNAL_MSI", kvmSignalMSI, unsafe.Pointer(&m))
	return err
}

// IOEventFD describes a guest write that KVM turns into an eventfd signal
// without exiting to userspace.
type IOEventFD struct {
	Addr      uint64
	Len       uint32 // 0 matches any length (MMIO only)
	FD        int
	PIO       bool
	Datamatch *uint64 // nil matches any value
}

// IOEventFD registers e (KVM_IOEVENTFD).
func (vm *VM) IOEventFD(e IOEventFD) error {
	return vm.ioeventfd(e, 0)
}

// DeassignIOEventFD removes a registration made by IOEventFD.
func (vm *VM) DeassignIOEventFD(e IOEventFD) error {
	return vm.ioeventfd(e, ioeventfdFlagDeassign)
}

func (vm *VM) ioeventfd(e IOEventFD, flags uint32) error {
	a := ioeventfd{Addr: e.Addr, Len: e.Len, FD: int32(e.FD), Flags: flags}
	if e.PIO {
		a.Flags |= ioeventfdFlagPIO
	}
	if e.Datamatch != nil {
		a.Flags |= ioeventfdFlagDatamatch
		a.Datamatch = *e.Datamatch
	}
	_, err := doPtr(vm.fd, "KVM_IOEVENTFD", kvmIOEventFD, unsafe.Pointer(&a))
	return err
}

// IRQChip reads one in-kernel interrupt controller (chip is IRQChipPICMaster,
// IRQChipPICSlave or IRQChipIOAPIC).
func (vm *VM) IRQChip(chip uint32) (IRQChip, error) {
	c := IRQChip{ChipID: chip}
	_, err := doPtr(vm.fd, "KVM_GET_IRQCHIP", kvmGetIRQChip, unsafe.Pointer(&c))
	return c, err
}

// SetIRQChip writes one in-kernel interrupt controller.
func (vm *VM) SetIRQChip(c IRQChip) error {
	_, err := doPtr(vm.fd, "KVM_SET_IRQCHIP", kvmSetIRQChip, unsafe.Pointer(&c))
	return err
}

// PIT2 reads the in-kernel PIT.
func (vm *VM) PIT2() (PITState2, error) {
	var p PITState2
	_, err := doPtr(vm.fd, "KVM_GET_PIT2", kvmGetPIT2, unsafe.Pointer(&p))
	return p, err
}

// SetPIT2 writes the in-kernel PIT.
func (vm *VM) SetPIT2(p PITState2) error {
	_, err := doPtr(vm.fd, "KVM_SET_PIT2", kvmSetPIT2, unsafe.Pointer(&p))
	return err
}

// Clock reads the VM's kvmclock (KVM_GET_CLOCK).
func (vm *VM) Clock() (ClockData, error) {
	var c ClockData
	_, err := doPtr(vm.fd, "KVM_GET_CLOCK", kvmGetClock, unsafe.Pointer(&c))
	return c, err
}

// SetClock sets the VM's kvmclock (KVM_SET_CLOCK).
func (vm *VM) SetClock(c ClockData) error {
	_, err := doPtr(vm.fd, "KVM_SET_CLOCK", kvmSetClock, unsafe.Pointer(&c))
	return err
}

// EnableCap enables a VM capability with its arguments.
func (vm *VM) EnableCap(cap uint32, args ...uint64) error {
	c := enableCap{Cap: cap}
	copy(c.Args[:], args)
	_, err := doPtr(vm.fd, "KVM_ENABLE_CAP", kvmEnableCap, unsafe.Pointer(&c))
	return err
}

// DirtyLog fills bitmap (one bit per page of the slot, in uint64 words) with
// the pages written since the last call, and resets them (KVM_GET_DIRTY_LOG).
// With manual protection enabled it only reports; ClearDirtyLog re-arms.
func (vm *VM) DirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return nil
	}
	d := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, err := doPtr(vm.fd, "KVM_GET_DIRTY_LOG", kvmGetDirtyLog, unsafe.Pointer(&d))
	// bitmap must stay alive until the ioctl returned: the kernel wrote
	// through a pointer that the garbage collector cannot see in d.
	runtime.KeepAlive(bitmap)
	return err
}

// ClearDirtyLog write-protects again the pages set in bitmap, which covers
// numPages pages from firstPage (both multiples of 64) of slot
// (KVM_CLEAR_DIRTY_LOG, with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled).
func (vm *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return nil
	}
	c := clearDirtyLog{Slot: slot, FirstPage: firstPage, NumPages: numPages,
		Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	_, err := doPtr(vm.fd, "KVM_CLEAR_DIRTY_LOG", kvmClearDirtyLog, unsafe.Pointer(&c))
	runtime.KeepAlive(bitmap)
	return err
}

// EnableDirtyRing gives every vCPU created from now on a dirty ring of
// bytes bytes (a power of two, at most what KVM_CHECK_EXTENSION answers
// for the capability), with KVM_CAP_DIRTY_LOG_RING_ACQ_REL when KVM has
// it, else KVM_CAP_DIRTY_LOG_RING. It must come before the first vCPU.
// From then on KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG are refused.
func (vm *VM) EnableDirtyRing(bytes uint32) error {
	cap := uint32(CapDirtyLogRingAcqRel)
	if vm.CheckExtension(CapDirtyLogRingAcqRel) <= 0 {
		cap = CapDirtyLogRing
	}
	return vm.EnableCap(cap, uint64(bytes))
}

// ResetDirtyRings write-protects again every page whose ring entry the VMM
// collected (DirtyRing.Collect), on every vCPU, and frees those entries
// (KVM_RESET_DIRTY_RINGS). It returns how many entries it reset.
func (vm *VM) ResetDirtyRings() (int, error) {
	return doVal(vm.fd, "KVM_RESET_DIRTY_RINGS", kvmResetDirtyRings, 0)
}

// CreateVCPU creates vCPU id and maps its kvm_run page. Call it on the OS
// thread that will run the vCPU.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := doVal(vm.fd, "KVM_CREATE_VCPU", kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, err
	}
	run, err := unix.Mmap(fd, 0, vm.runSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, &IoctlError{Op: "mmap kvm_run", Errno: err.(unix.Errno)}
	}
	return &VCPU{fd: fd, id: id, run: runPage(run), vm: vm}, nil
}

// TSCKHz is the TSC frequency vCPUs created from now on get
// (KVM_GET_TSC_KHZ on the VM; needs KVM_CAP_VM_TSC_CONTROL).
func (vm *VM) TSCKHz() (uint32, error) {
	r, err := doVal(vm.fd, "KVM_GET_TSC_KHZ", kvmGetTSCKHz, 0)
	return uint32(r), err
}
