package main

import (
	"fmt"
	"os"
	"syscall"
	"unsafe"

	"govmm/guestimg/internal/guestproto"
)

// Linux/amd64 ioctl and system call numbers the syscall package lacks
// (include/uapi/asm-generic/ioctls.h, arch/x86/entry/syscalls).
const (
	ioctlTCSETS              = 0x5402
	ioctlTCSBRK              = 0x5409
	sysFinitModule           = 313
	moduleInitCompressedFile = 4 // MODULE_INIT_COMPRESSED_FILE
)

func ioctl(fd int, req, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, arg); e != 0 {
		return e
	}
	return nil
}

// setRawOutput clears OPOST on the terminal so that "\n" reaches the
// serial port as one byte, not "\r\n": command mode's output is byte-exact.
func setRawOutput(tty string) error {
	fd, err := syscall.Open(tty, syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	var t syscall.Termios
	if err := ioctl(fd, syscall.TCGETS, uintptr(unsafe.Pointer(&t))); err != nil {
		return fmt.Errorf("get termios: %w", err)
	}
	t.Oflag &^= syscall.OPOST
	if err := ioctl(fd, ioctlTCSETS, uintptr(unsafe.Pointer(&t))); err != nil {
		return fmt.Errorf("set termios: %w", err)
	}
	return nil
}

// drainTTY waits until the serial port has sent everything written to the
// terminal on fd so far: tcdrain(3), which is TCSBRK with a non-zero
// argument. It waits for the tty's buffer to empty and then for the
// UART's transmitter (LSR TEMT), so every byte has reached the VMM.
func drainTTY(fd int) error {
	return ioctl(fd, ioctlTCSBRK, 1)
}

// writeExitPort writes status to guestproto.ExitPort through /dev/port.
// A VMM that implements the port stops the machine during the write.
func writeExitPort(status byte) error {
	f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt([]byte{status}, guestproto.ExitPort)
	return err
}

// pulseResetLine resets the machine through the keyboard controller's
// reset line (command 0xfe on port 0x64), through /dev/port. A VMM that
// emulates the i8042 stops or resets the machine during the write.
func pulseResetLine() error {
	f, err := os.OpenFile("/dev/port", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = f.WriteAt([]byte{0xfe}, 0x64)
	return err
}
