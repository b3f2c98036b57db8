package main

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"govmm/guestimg/internal/guestproto"
)

// setRawOutput clears OPOST on the terminal so that "\n" reaches the
// serial port as one byte, not "\r\n": command mode's output is byte-exact.
func setRawOutput(tty string) error {
	fd, err := unix.Open(tty, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return fmt.Errorf("get termios: %w", err)
	}
	t.Oflag &^= unix.OPOST
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		return fmt.Errorf("set termios: %w", err)
	}
	return nil
}

// drainConsole waits until the UART has sent everything written so far
// (tcdrain), so the VMM has all output before the machine stops.
func drainConsole(f *os.File) {
	_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1)
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
