package vmm

// Go Ps for the vCPU threads. A vCPU spends its life in KVM_RUN, a system
// call, and gives up its P there; when a pause kicks it out, it needs a P
// again to answer. With GOMAXPROCS at the host's CPUs and every P busy
// with other goroutines (the stream compressing and sending the last
// checkpoint, device threads), it waits for one to be preempted: up to
// the scheduler's 10 ms slice, and the whole pause with it. One P more
// per vCPU of the live machines lets a returning vCPU find an idle one.
// Measured on this project's 2-core host with two busy goroutines in
// the process, Pause of a 2-vCPU machine: median 17-18 ms at GOMAXPROCS
// 2, 59-63 µs with the extra Ps (BenchmarkPauseWithBusyGoroutines).
// The OS still shares the cores: extra Ps only stop Go's own scheduler
// from holding a vCPU back. A GOMAXPROCS the user set in the environment
// is left alone.

import (
	"os"
	"runtime"
	"sync"
)

var procs struct {
	mu    sync.Mutex
	base  int // GOMAXPROCS before the first machine raised it
	vcpus int // vCPUs of the machines that hold extra Ps
}

// holdProcs raises GOMAXPROCS by n vCPUs; it reports whether it did (the
// machine gives them back with releaseProcs on Close).
func holdProcs(n int) bool {
	if os.Getenv("GOMAXPROCS") != "" {
		return false
	}
	procs.mu.Lock()
	defer procs.mu.Unlock()
	if procs.vcpus == 0 {
		procs.base = runtime.GOMAXPROCS(0)
	}
	procs.vcpus += n
	runtime.GOMAXPROCS(procs.base + procs.vcpus)
	return true
}

// releaseProcs gives back what holdProcs(n) took.
func releaseProcs(n int) {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	procs.vcpus -= n
	runtime.GOMAXPROCS(procs.base + procs.vcpus)
}
