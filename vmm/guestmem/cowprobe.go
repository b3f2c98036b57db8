package guestmem

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// probeWriteProtect protects a page of a scratch mapping, has the kernel
// write it (a read(2) from a pipe into it, as KVM writes guest memory on
// a vCPU's behalf) and checks that the fault is reported and the write
// completes once the page is un-protected: some kernels accept the ioctls
// and still never report the fault. (A goroutine's own store would do
// less well: the runtime's preemption signals interrupt its wait on the
// fault again and again, each time taking its report back.)
func probeWriteProtect() error {
	u, err := openUffd()
	if err != nil {
		return err
	}
	defer u.close()
	b, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("probe write-protect: map a page: %w", err)
	}
	defer unix.Munmap(b)
	b[0] = 1 // populated: write-protection applies to present pages
	var pipe [2]int
	if err := unix.Pipe2(pipe[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("probe write-protect: pipe: %w", err)
	}
	defer unix.Close(pipe[0])
	defer unix.Close(pipe[1])
	if _, err := unix.Write(pipe[1], []byte{2}); err != nil {
		return fmt.Errorf("probe write-protect: pipe: %w", err)
	}
	addr := hostAddr(b)
	if err := u.register(addr, PageSize); err != nil {
		return err
	}
	defer u.unregister(addr, PageSize)
	if err := u.protect(addr, PageSize, true, false); err != nil {
		return fmt.Errorf("%w: UFFDIO_WRITEPROTECT: %v", ErrNoWriteProtect, err)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := unix.Read(pipe[0], b[1:2])
		wrote <- err
	}()
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
	msgs := make([]uffdMsg, 1)
	reported := false
	for deadline := time.Now().Add(5 * time.Second); !reported && time.Now().Before(deadline); {
		if _, err := unix.Poll(fds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			break
		}
		n, err := u.read(msgs)
		if err != nil {
			break
		}
		reported = n == 1 && msgs[0].Event == uffdEventPagefault && msgs[0].Flags&uffdPagefaultFlagWP != 0 &&
			uintptr(msgs[0].Address)&^(PageSize-1) == addr
	}
	// Whatever happened, let the writer through before unmapping.
	uerr := u.protect(addr, PageSize, false, false)
	select {
	case err := <-wrote:
		if err != nil {
			return fmt.Errorf("%w: the kernel's write to a protected page failed: %v", ErrNoWriteProtect, err)
		}
	case <-time.After(5 * time.Second):
		return fmt.Errorf("%w: a write to an un-protected page stayed blocked", ErrNoWriteProtect)
	}
	if uerr != nil {
		return fmt.Errorf("%w: un-protect: %v", ErrNoWriteProtect, uerr)
	}
	if !reported {
		return fmt.Errorf("%w: a write to a protected page was not reported", ErrNoWriteProtect)
	}
	if b[1] != 2 {
		return fmt.Errorf("%w: a write held by a fault was lost", ErrNoWriteProtect)
	}
	return nil
}
