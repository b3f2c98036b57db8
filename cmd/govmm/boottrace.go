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
	fmt.Fprintf(os.Stderr, "govmm: boot trace: %s\n", p)
}
