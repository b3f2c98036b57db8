package guestmem

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// The userfaultfd ABI (<linux/userfaultfd.h>) as far as write-protection
// needs it. golang.org/x/sys has only the syscall number; TestUffdABI pins
// these to the C compiler's values.
const (
	uffdAPI                        = 0xaa
	uffdioAPI                      = 0xc018aa3f // _IOWR(0xAA, 0x3F, struct uffdio_api)
	uffdioRegister                 = 0xc020aa00 // _IOWR(0xAA, 0x00, struct uffdio_register)
	uffdioUnregister               = 0x8010aa01 // _IOR(0xAA, 0x01, struct uffdio_range)
	uffdioWake                     = 0x8010aa02 // _IOR(0xAA, 0x02, struct uffdio_range)
	uffdioWriteprotect             = 0xc018aa06 // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
	userfaultfdIocNew              = 0xaa00     // _IO(0xAA, 0x00), on /dev/userfaultfd
	uffdFeaturePagefaultFlagWP     = 1 << 0
	uffdioRegisterModeWP           = 1 << 1
	uffdioWriteprotectModeWP       = 1 << 0
	uffdioWriteprotectModeDontwake = 1 << 1
	uffdEventPagefault             = 0x12
	uffdPagefaultFlagWrite         = 1 << 0
	uffdPagefaultFlagWP            = 1 << 1
	uffdioWriteprotectBit          = 0x06 // _UFFDIO_WRITEPROTECT: its bit in the ioctls masks
)

type uffdioAPIArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

type uffdioRange struct {
	Start uint64
	Len   uint64
}

type uffdioRegisterArg struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

type uffdioWriteprotectArg struct {
	Range uffdioRange
	Mode  uint64
}

// uffdMsg is struct uffd_msg (packed, 32 bytes) for a page fault: the
// other events are never enabled.
type uffdMsg struct {
	Event   uint8
	_       [7]byte
	Flags   uint64
	Address uint64
	_       [8]byte
}

// ErrNoWriteProtect is why copy-on-write is unavailable: the kernel (or
// its configuration, or this process's privileges) offers no userfaultfd
// write-protection for anonymous memory.
var ErrNoWriteProtect = errors.New("userfaultfd write-protect unavailable")

// uffd is one userfaultfd, non-blocking, with write-protect faults
// enabled.
type uffd struct {
	fd int
}

// openUffd creates a userfaultfd that also reports faults taken in the
// kernel (KVM's, on behalf of a vCPU), so no UFFD_USER_MODE_ONLY, and
// enables write-protect faults on it.
func openUffd() (*uffd, error) {
	fd, err := uffdSyscall(unix.O_CLOEXEC | unix.O_NONBLOCK)
	if err != nil {
		// Where the syscall is restricted (vm.unprivileged_userfaultfd),
		// the device node may still be open to us.
		dev, derr := os.OpenFile("/dev/userfaultfd", os.O_RDWR, 0)
		if derr != nil {
			return nil, fmt.Errorf("%w: userfaultfd: %v; /dev/userfaultfd: %v", ErrNoWriteProtect, err, derr)
		}
		fd, err = ioctlInt(int(dev.Fd()), userfaultfdIocNew, unix.O_CLOEXEC|unix.O_NONBLOCK)
		dev.Close()
		if err != nil {
			return nil, fmt.Errorf("%w: /dev/userfaultfd: %v", ErrNoWriteProtect, err)
		}
	}
	u := &uffd{fd: fd}
	api := uffdioAPIArg{API: uffdAPI, Features: uffdFeaturePagefaultFlagWP}
	if err := u.ioctl(uffdioAPI, &api); err != nil {
		u.close()
		return nil, fmt.Errorf("%w: UFFDIO_API with write-protect faults: %v", ErrNoWriteProtect, err)
	}
	if api.Features&uffdFeaturePagefaultFlagWP == 0 {
		u.close()
		return nil, fmt.Errorf("%w: the kernel does not offer UFFD_FEATURE_PAGEFAULT_FLAG_WP", ErrNoWriteProtect)
	}
	return u, nil
}

func (u *uffd) close() {
	if u.fd >= 0 {
		_ = unix.Close(u.fd)
		u.fd = -1
	}
}

// register registers [addr, addr+n) in write-protect mode.
func (u *uffd) register(addr, n uintptr) error {
	reg := uffdioRegisterArg{Range: uffdioRange{Start: uint64(addr), Len: uint64(n)}, Mode: uffdioRegisterModeWP}
	if err := u.ioctl(uffdioRegister, &reg); err != nil {
		return fmt.Errorf("%w: UFFDIO_REGISTER (write-protect) of %d MiB: %v", ErrNoWriteProtect, n>>20, err)
	}
	if reg.Ioctls&(1<<uffdioWriteprotectBit) == 0 {
		_ = u.unregister(addr, n)
		return fmt.Errorf("%w: UFFDIO_WRITEPROTECT not offered on this memory", ErrNoWriteProtect)
	}
	return nil
}

func (u *uffd) unregister(addr, n uintptr) error {
	r := uffdioRange{Start: uint64(addr), Len: uint64(n)}
	return u.ioctl(uffdioUnregister, &r)
}

// protect write-protects [addr, addr+n), or un-protects it (and, unless
// dontWake, wakes the threads waiting on a fault in it).
func (u *uffd) protect(addr, n uintptr, wp, dontWake bool) error {
	a := uffdioWriteprotectArg{Range: uffdioRange{Start: uint64(addr), Len: uint64(n)}}
	if wp {
		a.Mode |= uffdioWriteprotectModeWP
	}
	if dontWake {
		a.Mode |= uffdioWriteprotectModeDontwake
	}
	return u.ioctl(uffdioWriteprotect, &a)
}

// wake wakes the threads waiting on a fault in [addr, addr+n).
func (u *uffd) wake(addr, n uintptr) error {
	r := uffdioRange{Start: uint64(addr), Len: uint64(n)}
	return u.ioctl(uffdioWake, &r)
}
