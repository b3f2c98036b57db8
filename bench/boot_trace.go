package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"

	"govmm/internal/boottrace"
)

// bootTrialResult is one boot: time to the ready line, memory then, and
// the breakdown.
type bootTrialResult struct {
	ready     time.Duration
	mem       Memory
	phases    boottrace.Phases
	phasesErr error
}

// bootTraceTrial starts cmd, records its console (stdout) line by line
// until the ready line, samples its memory, then ends it. A govmm child
// reports its VMM setup time on stderr (run --boot-trace); for QEMU that
// part stays unknown.
func bootTraceTrial(ctx context.Context, cmd *exec.Cmd, guestBytes uint64, timeout time.Duration) (bootTrialResult, error) {
	var r bootTrialResult
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return r, err
	}
	stderrR, err := cmd.StderrPipe()
	if err != nil {
		return r, err
	}
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	rec := boottrace.NewRecorder(nil)
	ready := make(chan struct{})
	closed := false
	rec.OnLine = func(l boottrace.Line) {
		if !closed && strings.Contains(l.Text, boottrace.ReadyLine) {
			closed = true
			close(ready)
		}
	}
	setup := make(chan time.Duration, 1)
	start := time.Now()
	// govmm's boot trace then measures its VMM setup from here, exec and
	// the Go runtime's start included, as the ready time is.
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", boottrace.StartEnv, start.UnixNano()))
	if err := cmd.Start(); err != nil {
		return r, err
	}
	defer func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}()
	exited := make(chan struct{})
	go func() {
		_, _ = io.Copy(rec, stdout)
		close(exited)
	}()
	stderr := readStderr(stderrR, setup)
	select {
	case <-ready:
	case <-exited:
		return r, fmt.Errorf("%s exited before the ready line: %s", cmd.Path, stderr.last())
	case <-time.After(timeout):
		return r, fmt.Errorf("%s: no ready line within %s; its console's last lines, each at its time since start:\n%s", cmd.Path, timeout, consoleTail(rec.Lines(), start, 8))
	case <-ctx.Done():
		return r, ctx.Err()
	}
	return readyTrial(cmd, start, rec.Lines(), setup, guestBytes)
}

// consoleTail is the last n of lines, each with its time since start: a
// boot that stalls says where, and since when.
func consoleTail(lines []boottrace.Line, start time.Time, n int) string {
	if len(lines) == 0 {
		return "  (none)"
	}
	var b strings.Builder
	for _, l := range lines[max(0, len(lines)-n):] {
		fmt.Fprintf(&b, "  %8.1f s  %s\n", l.At.Sub(start).Seconds(), l.Text)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// vmmStderr reads a VMM's stderr in a goroutine of its own: the first
// boot-trace report's VMM setup goes to setup, and the start of the rest
// is kept for the error when the VMM exits before its ready line.
type vmmStderr struct {
	done chan struct{} // closed when stderr ends
	mu   sync.Mutex
	kept strings.Builder
}

func readStderr(r io.Reader, setup chan<- time.Duration) *vmmStderr {
	e := &vmmStderr{done: make(chan struct{})}
	go func() {
		defer close(e.done)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if d, ok := boottrace.SetupFromReport(sc.Text()); ok {
				select { // the first report's; never stop reading stderr
				case setup <- d:
				default:
				}
				continue
			}
			e.mu.Lock()
			if e.kept.Len() < 4096 {
				e.kept.WriteString(sc.Text() + "\n")
			}
			e.mu.Unlock()
		}
	}()
	return e
}

// last is the last line kept, once stderr ended (or a second went by: a
// child may hold it open).
func (e *vmmStderr) last() string {
	select {
	case <-e.done:
	case <-time.After(time.Second):
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return lastLine(e.kept.String())
}

// readyTrial is a boot trial's result once its ready line came: the time
// to it from start, the VMM's memory, and the phases from the guest's
// lines and, for govmm, the VMM setup its report gives on setup.
func readyTrial(cmd *exec.Cmd, start time.Time, lines []boottrace.Line, setup <-chan time.Duration, guestBytes uint64) (bootTrialResult, error) {
	var r bootTrialResult
	for _, l := range lines {
		if strings.Contains(l.Text, boottrace.ReadyLine) {
			r.ready = l.At.Sub(start)
			break
		}
	}
	var err error
	if r.mem, err = readMemory(cmd.Process.Pid, guestBytes); err != nil {
		return r, err
	}
	var firstRun time.Time
	if strings.Contains(cmd.Path, "govmm") || slicesContains(cmd.Args, "--boot-trace") {
		// govmm prints its report right after the ready line.
		select {
		case d := <-setup:
			firstRun = start.Add(d)
		case <-time.After(5 * time.Second):
		}
	}
	r.phases, r.phasesErr = boottrace.Compute(start, firstRun, lines)
	return r, nil
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// bootPhaseNames are the stacked segments, bottom up.
var bootPhaseNames = []string{"VMM setup", "decompression (QEMU: + setup, firmware)", "kernel init", "initramfs unpack", "/init to ready"}

func phaseValues(p boottrace.Phases) []float64 {
	return []float64{msOf(p.VMMSetup), msOf(p.Decompress), msOf(p.KernelInit), msOf(p.Unpack), msOf(p.InitToReady)}
}

// medianPhases returns, per VMM in order of first appearance, the median
// of each phase over the samples that have a breakdown.
func medianPhases(samples []BootSample) (names []string, med [][]float64) {
	by := map[string][][]float64{}
	for _, s := range samples {
		if s.PhasesErr != nil {
			continue
		}
		if _, ok := by[s.VMM]; !ok {
			names = append(names, s.VMM)
		}
		by[s.VMM] = append(by[s.VMM], phaseValues(s.Phases))
	}
	for _, n := range names {
		m := make([]float64, len(bootPhaseNames))
		for i := range m {
			var col []float64
			for _, v := range by[n] {
				col = append(col, v[i])
			}
			m[i] = Summarize(col).Median
		}
		med = append(med, m)
	}
	return names, med
}

// bootPhasesTable is the median breakdown per VMM as a Markdown table.
func bootPhasesTable(samples []BootSample) string {
	names, med := medianPhases(samples)
	if len(names) == 0 {
		return ""
	}
	out := "\nMedian breakdown (ms; `boot_phases.png`, from the console: when the kernel's phase lines arrived where it showed them, else their printk stamps (the guest's boot trace line), see internal/boottrace):\n\n| VMM | " +
		strings.Join(bootPhaseNames, " | ") + " |\n|---|" + strings.Repeat("---|", len(bootPhaseNames)) + "\n"
	for i, n := range names {
		out += "| " + n
		for _, v := range med[i] {
			out += fmt.Sprintf(" | %.1f", v)
		}
		out += " |\n"
	}
	return out
}

// plotBootPhases draws the median breakdown per VMM as stacked bars and
// writes it beside as CSV (path + .csv, .png, .svg).
func plotBootPhases(path string, samples []BootSample) error {
	names, med := medianPhases(samples)
	if len(names) == 0 {
		return nil
	}
	var rows [][]string
	for i, n := range names {
		row := []string{n}
		for _, v := range med[i] {
			row = append(row, ftoa(v, 3))
		}
		rows = append(rows, row)
	}
	header := append([]string{"vmm"}, "vmm_setup_ms", "decompress_ms", "kernel_init_ms", "unpack_ms", "init_to_ready_ms")
	if err := writeCSV(path+".csv", header, rows); err != nil {
		return err
	}
	p := plot.New()
	p.Title.Text = "Boot time to the ready line, median breakdown"
	p.Y.Label.Text = "ms"
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	w := vg.Points(40)
	var below *plotter.BarChart
	for j, phase := range bootPhaseNames {
		vals := make(plotter.Values, len(names))
		for i := range names {
			vals[i] = med[i][j]
		}
		b, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		b.Color = plotutil.Color(j)
		b.LineStyle.Width = 0
		if below != nil {
			b.StackOn(below)
		}
		below = b
		p.Add(b)
		p.Legend.Add(phase, b)
	}
	p.NominalX(names...)
	top := 0.0
	for _, m := range med {
		sum := 0.0
		for _, v := range m {
			sum += v
		}
		top = max(top, sum)
	}
	p.Y.Min, p.Y.Max = 0, top*1.45 // room for the legend above the bars
	return savePlot(p, 7*vg.Inch, 5*vg.Inch, path+".png")
}
