package vmm

import (
	"fmt"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A vCPU thread's tick on its own CPU clock, for the dirty ring on
// kvm_pvm (ringwatch.go): every ringTickEvery of CPU time the thread
// spends, in the guest or out of it, a POSIX timer on the thread's CPU
// clock (CLOCK_THREAD_CPUTIME_ID) sends it kickSignal, KVM_RUN returns
// EINTR, and the vCPU looks at the rings before it runs again. A guest
// can fill its ring only while its thread runs, so the look keeps pace
// with the filling however loaded the host is, where the watcher's
// goroutine must first get a CPU of its own.

// ringTickEvery is a vCPU thread's CPU time between two looks at the
// rings: kvm_pvm fills ~230,000 entries a second of guest time, ~1,150
// per tick, against a quarter of a 64k-entry ring that triggers a reap.
const ringTickEvery = 5 * time.Millisecond

// Linux's values (include/uapi/linux/time.h, asm-generic/siginfo.h).
const (
	clockThreadCPUTime = 3 // CLOCK_THREAD_CPUTIME_ID
	sigevThreadID      = 4 // SIGEV_THREAD_ID
)

// sigevent is the kernel's struct sigevent (64 bytes) as
// SIGEV_THREAD_ID fills it.
type sigevent struct {
	value  uintptr
	signo  int32
	notify int32
	tid    int32
	_      [44]byte
}

// cpuTimer is a POSIX timer (its kernel id).
type cpuTimer struct{ id int32 }

// startCPUTimer starts a timer on the calling thread's CPU clock that
// sends kickSignal to that thread every interval of its CPU time. The
// caller keeps its goroutine on the thread (runtime.LockOSThread).
func startCPUTimer(every time.Duration) (*cpuTimer, error) {
	ev := sigevent{signo: int32(kickSignal), notify: sigevThreadID, tid: int32(unix.Gettid())}
	var id int32
	if _, _, e := unix.Syscall(unix.SYS_TIMER_CREATE, clockThreadCPUTime, uintptr(unsafe.Pointer(&ev)), uintptr(unsafe.Pointer(&id))); e != 0 {
		return nil, fmt.Errorf("timer_create on the thread's CPU clock: %w", e)
	}
	t := &cpuTimer{id: id}
	ts := unix.NsecToTimespec(int64(every))
	spec := unix.ItimerSpec{Interval: ts, Value: ts}
	if _, _, e := unix.Syscall6(unix.SYS_TIMER_SETTIME, uintptr(id), 0, uintptr(unsafe.Pointer(&spec)), 0, 0, 0); e != 0 {
		t.stop()
		return nil, fmt.Errorf("timer_settime: %w", e)
	}
	return t, nil
}

// stop deletes the timer; no signal comes from it after that.
func (t *cpuTimer) stop() {
	_, _, _ = unix.Syscall(unix.SYS_TIMER_DELETE, uintptr(t.id), 0, 0)
}
