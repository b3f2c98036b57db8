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
	"time"
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

// pauseSpin is Machine.spin for a machine of cpus vCPUs: how long the two
// sides of a cut poll for each other's next message before they sleep.
// A cut is a few round trips between the goroutine that takes it and the
// vCPU threads (pause, save, resume), each answered within microseconds
// on hardware, and a thread that sleeps between them costs a wake-up each:
// on a host whose idle CPUs halt (a VM) that is 0.1-0.4 ms, in the lab
// more. Polling only pays where the host has a CPU for the VMM beside
// every vCPU: otherwise a polling vCPU thread takes the CPU the cut's own
// work (the harvest, the copy) needs; and past pollAlone a poll yields
// its CPU between looks (pollRecv). GOVMM_PAUSE_SPIN (a duration, 0 for
// never; what does not parse as one is ignored) overrides it, for
// measuring.
func pauseSpin(cpus int) time.Duration {
	if v := os.Getenv("GOVMM_PAUSE_SPIN"); v != "" {
		if d, err := time.ParseDuration(v); err == nil {
			return max(d, 0)
		}
	}
	if runtime.NumCPU() <= cpus {
		return 0
	}
	return defaultPauseSpin
}

// defaultPauseSpin bounds a poll. Between a vCPU's answer to the save and
// the resume comes the rest of the copy: a stop-and-copy of up to the few
// thousand pages below copy-on-write's threshold is about a millisecond
// on hardware (0.25 µs a page), so a vCPU still polls when the resume
// comes; a longer cut is waited for asleep. In the lab, 2 ms against
// 500 µs: the pause at 1,024 dirty pages 0.70-0.75×, at 64 even
// (bench/results/20261206T152500Z).
const defaultPauseSpin = 2 * time.Millisecond
