package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"govmm/internal/boottrace"
	"govmm/vmm"
)

// processStart stands for the process's start in the boot trace, so that
// the VMM setup covers exec and the Go runtime's start (0.1-0.2 s of a
// boot in the lab, which the package's init alone would leave out and
// govmm bench boot then counted as decompression): see startTime.
var processStart = startTime()

// initAt is when this package was initialized: exec and the Go runtime's
// start lie between processStart and it.
var initAt = time.Now()

// startTime is when this process started: the time in $GOVMM_BOOT_TRACE_T0
// (boottrace.StartEnv: govmm bench sets it as it starts govmm), else the
// kernel's record (/proc/self/stat: to 10 ms, never late), else now
// (package variables are set after the Go runtime started). A start more
// than a minute ago is not believed: govmm reads it as it starts.
func startTime() time.Time { return startTimeWithin(time.Minute) }

// startTimeWithin is startTime believing starts up to maxAge ago.
func startTimeWithin(maxAge time.Duration) time.Time {
	now := time.Now()
	if v, err := strconv.ParseInt(os.Getenv(boottrace.StartEnv), 10, 64); err == nil && v > 0 {
		if t := time.Unix(0, v); t.Before(now) && now.Sub(t) < maxAge {
			return t
		}
	}
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return now
	}
	now, boottime, ok := clockPair()
	if !ok {
		return now
	}
	if t, ok := boottrace.ProcessStart(string(stat), now, boottime); ok && now.Sub(t) < maxAge {
		return t
	}
	return now
}

// clockPair reads the wall clock and CLOCK_BOOTTIME at (nearly) the same
// moment: the wall clock between two readings of boottime, the tightest
// of a few tries, boottime the later reading, so that a start computed
// from the pair stays never late. A thread stalled between two plain
// readings (tens of ms in the lab, whose vCPUs share the host's CPUs) put
// the start that much early.
func clockPair() (now time.Time, boottime time.Duration, ok bool) {
	var ts unix.Timespec
	best := time.Duration(-1)
	for range 5 {
		if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
			return time.Now(), 0, false
		}
		b1 := time.Duration(ts.Nano())
		n := time.Now()
		if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
			return time.Now(), 0, false
		}
		b2 := time.Duration(ts.Nano())
		if best < 0 || b2-b1 < best {
			best, now, boottime = b2-b1, n, b2
		}
		if best < 100*time.Microsecond {
			break
		}
	}
	return now, boottime, true
}

// bootTracer records the console's lines for `run --boot-trace` and says
// when the ready line came.
type bootTracer struct {
	rec   *boottrace.Recorder
	ready chan struct{} // closed at the first ready line
	// The VMM setup's steps: files is when run had the kernel and
	// initramfs mapped, starting when it called the machine's Start
	// (having created the machine and its devices); Start then loads the
	// kernel and initramfs into guest memory (vmm.Machine.Loaded) and
	// sets up the vCPUs (to Released, the first KVM_RUN).
	files, starting time.Time
}

func newBootTracer() *bootTracer {
	t := &bootTracer{rec: boottrace.NewRecorder(nil), ready: make(chan struct{})}
	closed := false
	t.rec.OnLine = func(l boottrace.Line) {
		if !closed && strings.Contains(l.Text, boottrace.ReadyLine) {
			closed = true
			close(t.ready)
		}
	}
	return t
}

// report waits for the ready line (or the machine's end) and prints the
// breakdown on stderr.
func (t *bootTracer) report(m *vmm.Machine) {
	select {
	case <-t.ready:
	case <-m.Done():
		return
	}
	p, err := boottrace.Compute(processStart, m.Released(), t.rec.Lines())
	if err != nil {
		fmt.Fprintf(os.Stderr, "govmm: boot trace: %v (%.1f ms to ready)\n", err, float64(p.Total.Microseconds())/1000)
		return
	}
	fmt.Fprintf(os.Stderr, "govmm: boot trace: %s%s\n", p, setupSteps(processStart, initAt, t.files, t.starting, m.Loaded(), m.Released()))
}

// setupSteps splits the VMM setup, from the process's start to the first
// KVM_RUN (released), at the times run passed its steps; a step whose end
// is unknown (zero) or out of order is left out, its time going to the
// next one.
func setupSteps(start, init, files, starting, loaded, released time.Time) string {
	steps := []struct {
		end  time.Time
		what string
	}{
		{init, "exec and the Go runtime's start"},
		{files, "mapping the kernel and initramfs"},
		{starting, "creating the machine and its devices"},
		{loaded, "loading the guest into memory"},
		{released, "setting up the vCPUs"},
	}
	var parts []string
	from := start
	for _, st := range steps {
		if st.end.IsZero() || st.end.Before(from) || released.IsZero() || st.end.After(released) {
			continue
		}
		parts = append(parts, fmt.Sprintf("%.1f ms %s", float64(st.end.Sub(from).Microseconds())/1000, st.what))
		from = st.end
	}
	if len(parts) < 2 {
		return ""
	}
	return " (of the vmm setup: " + strings.Join(parts, ", ") + ")"
}
