package main

import (
	"fmt"
	"os"
	"syscall"
	"time"
	"unsafe"

	"govmm/guestimg/internal/guestproto"
)

// Linux/amd64 ioctl and system call numbers the syscall package lacks
// (include/uapi/asm-generic/ioctls.h, arch/x86/entry/syscalls).
const (
	ioctlTCSETS              = 0x5402
	ioctlTCSBRK              = 0x5409
	ioctlTIOCOUTQ            = 0x5411
	sysFinitModule           = 313
	moduleInitCompressedFile = 4 // MODULE_INIT_COMPRESSED_FILE
)

func ioctl(fd int, req, arg uintptr) error {
	for {
		_, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, arg)
		switch e {
		case 0:
			return nil
		case syscall.EINTR:
			// The tty layer ends a wait (TCSBRK's drain) with EINTR, not
			// a restart, when any signal is pending: the command's
			// SIGCHLD, or the Go runtime's own preemption signal.
			continue
		}
		return e
	}
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

// drainStall is how long drainTTY waits for the output queue to move
// before it gives up. Even in the lab a byte leaves the UART within
// milliseconds; ten seconds without one means the transmitter stalled.
const drainStall = 10 * time.Second

// drainPoll is how often drainTTY looks at the output queue.
const drainPoll = time.Millisecond

// drainTTY waits until the serial port has sent everything written to the
// terminal on fd so far, as tcdrain(3) does: until the tty's output queue
// is empty (TIOCOUTQ), then for the UART's transmitter (TCSBRK with a
// non-zero argument, which checks LSR TEMT), so every byte has reached
// the VMM. Unlike tcdrain it does not wait forever: if the queue makes no
// progress for drainStall it returns an error, so a stalled console costs
// the rest of the output, not the exit status. The stall is counted in
// polls as well as in time: a guest clock that jumps (seen in the lab,
// where a stall was declared 5 s after boot) must not cut a queue that
// moves.
func drainTTY(fd int) error {
	last, since, polls := int32(-1), time.Now(), 0
	for {
		var n int32
		if err := ioctl(fd, ioctlTIOCOUTQ, uintptr(unsafe.Pointer(&n))); err != nil {
			return fmt.Errorf("console output queue: %w", err)
		}
		if n == 0 {
			return ioctl(fd, ioctlTCSBRK, 1)
		}
		if n != last {
			last, since, polls = n, time.Now(), 0
		} else if polls++; polls >= int(drainStall/drainPoll) && time.Since(since) > drainStall {
			return fmt.Errorf("console output stalled with %d bytes unsent for %v", n, drainStall)
		}
		// A poll: the tty layer offers no wait with a timeout.
		time.Sleep(drainPoll)
	}
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

// logKernel writes msg to the kernel log (/dev/kmsg) at KERN_ALERT, which
// even command mode's console level lets through, should the console move
// again; it stays in the log either way.
func logKernel(msg string) { logKernelAt(1, msg) }

// logKernelAt writes msg to the kernel log at level (0 KERN_EMERG ... 7
// KERN_DEBUG).
func logKernelAt(level int, msg string) {
	if f, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		fmt.Fprintf(f, "<%d>%s\n", level, msg)
		f.Close()
	}
}
