package guestmem

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

func uffdSyscall(flags int) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

func ioctlInt(fd int, req uintptr, arg int) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

// ioctl passes arg, one of the uffdio_* mirrors above (plain structs of
// uint64s, laid out as the kernel's, see TestUffdABI), by address; the
// kernel reads and writes it only during the call. EINTR and EAGAIN (a
// range operation racing with a change of the mapping) are retried.
func (u *uffd) ioctl(req uintptr, arg any) error {
	var p unsafe.Pointer
	switch a := arg.(type) {
	case *uffdioAPIArg:
		p = unsafe.Pointer(a)
	case *uffdioRange:
		p = unsafe.Pointer(a)
	case *uffdioRegisterArg:
		p = unsafe.Pointer(a)
	case *uffdioWriteprotectArg:
		p = unsafe.Pointer(a)
	default:
		panic("guestmem: uffd ioctl with an unknown argument type")
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(u.fd), req, uintptr(p))
		switch errno {
		case 0:
			return nil
		case unix.EINTR, unix.EAGAIN:
			continue
		default:
			return errno
		}
	}
}

// read reads the pending messages into msgs (uffd_msg is 32 bytes, as
// uffdMsg); 0 when none is pending.
func (u *uffd) read(msgs []uffdMsg) (int, error) {
	b := unsafe.Slice((*byte)(unsafe.Pointer(&msgs[0])), len(msgs)*int(unsafe.Sizeof(msgs[0])))
	n, err := unix.Read(u.fd, b)
	if err == unix.EAGAIN || err == unix.EINTR {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return n / int(unsafe.Sizeof(msgs[0])), nil
}

// hostAddr is the address of b's first byte, for the kernel.
func hostAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }
