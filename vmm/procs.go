package vmm

import (
	"os"
	"runtime"
	"sync"
)

// Ps for the vCPU threads.
//
// A vCPU thread holds no P (the Go scheduler's right to run Go code)
// while it is in KVM_RUN, and needs one the moment it comes back: to
// handle an exit, to answer a pause or a resume. With GOMAXPROCS at the
// host's CPU count and the VMM's own goroutines busy on every P (a
// checkpoint's stream compressing, a standby applying), it waits for one
// behind them, up to the scheduler's 10 ms time slice; so does the
// goroutine it answers (a pause's), readied on the P the vCPU then takes
// into KVM_RUN until the runtime's monitor takes it back, and the
// copy-on-write fault handler a vCPU's write waits on. Measured on the
// checkpoint bench at 64k dirty pages with a compressed stream on two
// cores: the pause's stop and resume steps took 1–11 ms with GOMAXPROCS
// 2, 0.1–0.2 ms with 4. So Start raises GOMAXPROCS to the CPU count plus
// one per vCPU and one for the fault handler (never lowers it, and leaves
// it alone where the GOMAXPROCS environment variable sets it): the extra
// Ps let those threads run Go code at once, the kernel sharing the CPUs
// among them, and cost nothing while they sit in KVM_RUN.
var procsMu sync.Mutex

// reserveProcs raises GOMAXPROCS for a machine of vcpus vCPUs.
func reserveProcs(vcpus int) {
	if os.Getenv("GOMAXPROCS") != "" {
		return
	}
	procsMu.Lock()
	defer procsMu.Unlock()
	if want := runtime.NumCPU() + vcpus + 1; runtime.GOMAXPROCS(0) < want {
		runtime.GOMAXPROCS(want)
	}
}
