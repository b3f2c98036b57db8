package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"govmm/internal/boottrace"
	"govmm/vmm"
)

// processStart stands for the process's start in the boot trace: package
// variables are set before main runs, after the Go runtime started.
var processStart = time.Now()

// bootTracer records the console's lines for `run --boot-trace` and says
// when the ready line came.
type bootTracer struct {
	rec   *boottrace.Recorder
	ready chan struct{} // closed at the first ready line
	// starting is when the machine's Start was called: from there to
	// the first KVM_RUN it loads the kernel and initramfs into guest
	// memory and sets up the vCPUs, the VMM setup's largest part.
	starting time.Time
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
	load := ""
	if !t.starting.IsZero() && m.Released().After(t.starting) {
		load = fmt.Sprintf(" (of the vmm setup, %.1f ms loading the guest into memory and setting up its vCPUs)",
			float64(m.Released().Sub(t.starting).Microseconds())/1000)
	}
	fmt.Fprintf(os.Stderr, "govmm: boot trace: %s%s\n", p, load)
}
