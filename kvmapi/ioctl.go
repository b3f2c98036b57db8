package kvmapi

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Linux's _IOC encoding (include/uapi/asm-generic/ioctl.h).
const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2

	kvmio = 0xAE
)

func ioc(dir, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | kvmio<<8 | nr
}
func io(nr uintptr) uintptr         { return ioc(iocNone, nr, 0) }
func ior(nr, size uintptr) uintptr  { return ioc(iocRead, nr, size) }
func iow(nr, size uintptr) uintptr  { return ioc(iocWrite, nr, size) }
func iowr(nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, nr, size) }

// ioctl numbers, named after the kernel's with Go casing.
var (
	// System ioctls.
	kvmGetAPIVersion     = io(0x00)
	kvmCreateVM          = io(0x01)
	kvmGetMSRIndexList   = iowr(0x02, 4)
	kvmCheckExtension    = io(0x03)
	kvmGetVCPUMmapSize   = io(0x04)
	kvmGetSupportedCPUID = iowr(0x05, 8)

	// VM ioctls.
	kvmCreateVCPU          = io(0x41)
	kvmGetDirtyLog         = iow(0x42, 16)
	kvmSetUserMemoryRegion = iow(0x46, 32)
	kvmSetTSSAddr          = io(0x47)
	kvmSetIdentityMapAddr  = iow(0x48, 8)
	kvmCreateIRQChip       = io(0x60)
	kvmIRQLine             = iow(0x61, 8)
	kvmGetIRQChip          = iowr(0x62, 520)
	kvmSetIRQChip          = ior(0x63, 520)
	kvmRegisterCoalesced   = iow(0x67, 16)
	kvmCreatePIT2          = iow(0x77, 64)
	kvmIOEventFD           = iow(0x79, 64)
	kvmSetClock            = iow(0x7b, 48)
	kvmGetClock            = ior(0x7c, 48)
	kvmGetPIT2             = ior(0x9f, 112)
	kvmSetPIT2             = iow(0xa0, 112)
	kvmEnableCap           = iow(0xa3, 104)
	kvmSignalMSI           = iow(0xa5, 32)
	kvmClearDirtyLog       = iowr(0xc0, 24)
	kvmResetDirtyRings     = io(0xc7)
	kvmX86SetMSRFilter     = iow(0xc6, 392)
	kvmGetStatsFD          = io(0xce)

	// vCPU ioctls.
	kvmRun           = io(0x80)
	kvmGetRegs       = ior(0x81, 144)
	kvmSetRegs       = iow(0x82, 144)
	kvmGetSregs      = ior(0x83, 312)
	kvmSetSregs      = iow(0x84, 312)
	kvmGetMSRs       = iowr(0x88, 8)
	kvmSetMSRs       = iow(0x89, 8)
	kvmGetFPU        = ior(0x8c, 416)
	kvmSetFPU        = iow(0x8d, 416)
	kvmGetLAPIC      = ior(0x8e, 1024)
	kvmSetLAPIC      = iow(0x8f, 1024)
	kvmSetCPUID2     = iow(0x90, 8)
	kvmGetMPState    = ior(0x98, 4)
	kvmSetMPState    = iow(0x99, 4)
	kvmGetVCPUEvents = ior(0x9f, 64)
	kvmSetVCPUEvents = iow(0xa0, 64)
	kvmGetDebugRegs  = ior(0xa1, 128)
	kvmSetDebugRegs  = iow(0xa2, 128)
	kvmGetXsave      = ior(0xa4, 4096)
	kvmSetXsave      = iow(0xa5, 4096)
	kvmGetXCRs       = ior(0xa6, 392)
	kvmSetXCRs       = iow(0xa7, 392)
	kvmGetTSCKHz     = io(0xa3)
	kvmSetTSCKHz     = io(0xa2)
	kvmGetXsave2     = ior(0xcf, 4096)
)

// IoctlError is a failed KVM ioctl. It wraps the errno so that callers can
// test it with errors.Is(err, unix.EEXIST) and the like.
type IoctlError struct {
	Op    string // the kernel's name, e.g. "KVM_SET_USER_MEMORY_REGION"
	Errno unix.Errno
}

func (e *IoctlError) Error() string { return e.Op + ": " + e.Errno.Error() }

// Unwrap returns the errno.
func (e *IoctlError) Unwrap() error { return e.Errno }

// ErrInterrupted is returned by VCPU.Run when KVM_RUN returned EINTR: a
// signal (a kick, or the Go runtime's preemption) or immediate_exit.
var ErrInterrupted = errors.New("kvm_run interrupted")

func ioctlErr(op string, errno unix.Errno) error {
	return &IoctlError{Op: op, Errno: errno}
}

// ExitError is a vCPU exit that the caller cannot continue from.
type ExitError struct {
	Reason ExitReason
	Detail string
}

func (e *ExitError) Error() string {
	if e.Detail == "" {
		return fmt.Sprintf("kvm exit %s", e.Reason)
	}
	return fmt.Sprintf("kvm exit %s: %s", e.Reason, e.Detail)
}
