package kvmapi

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlPtr issues an ioctl whose argument is a pointer to a Go value. The
// pointer is converted to uintptr inside the Syscall argument list, which is
// the one form the unsafe rules (pattern 4) keep the object alive and
// unmoved for during the call.
func ioctlPtr(fd int, req uintptr, arg unsafe.Pointer) (uintptr, unix.Errno) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	return r, errno
}

// ioctlVal issues an ioctl whose argument is a plain integer.
func ioctlVal(fd int, req, arg uintptr) (uintptr, unix.Errno) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	return r, errno
}

// doPtr runs ioctlPtr and wraps a failure with the ioctl's name.
//
// doPtr and doVal retry EINTR. KVM_RUN (VCPU.Run, which does not use them)
// is the one ioctl whose EINTR means something, a kick; elsewhere it only
// means "a signal came, try again": KVM_CREATE_VM fails so when one of
// the Go runtime's signals arrives while KVM registers its MMU notifier
// (mm_take_all_locks gives up on a pending signal), which a slow host,
// e.g. the lab's emulated L1, makes likely.
func doPtr(fd int, op string, req uintptr, arg unsafe.Pointer) (int, error) {
	r, errno := ioctlPtr(fd, req, arg)
	for errno == unix.EINTR {
		r, errno = ioctlPtr(fd, req, arg)
	}
	if errno != 0 {
		return 0, ioctlErr(op, errno)
	}
	return int(r), nil
}

// doVal runs ioctlVal and wraps a failure with the ioctl's name.
func doVal(fd int, op string, req, arg uintptr) (int, error) {
	r, errno := ioctlVal(fd, req, arg)
	for errno == unix.EINTR {
		r, errno = ioctlVal(fd, req, arg)
	}
	if errno != 0 {
		return 0, ioctlErr(op, errno)
	}
	return int(r), nil
}
