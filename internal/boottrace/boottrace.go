// Package boottrace says where a guest's boot time went, from the VMM's
// clock (process start, first KVM_RUN, when each console line arrived)
// and the guest's own (the printk stamps of the kernel's console lines
// and the boot trace line that the default guest's /init prints just
// before its ready line; see guestimg/internal/guestproto).
//
// The two clocks are tied together where a guest line with a guest time
// t arrives at host time h: the guest clock's zero is at most h - t on the
// host's (a line can arrive late, never early), so the smallest h - t over
// all lines is the best estimate. The kernel's printk clock starts (at
// zero) early in setup_arch, after the decompressor has run: under KVM
// when the kvm-clock takes over as sched_clock (kvmclock_init); lines
// before it are stamped zero and are no anchor (an early console, e.g.
// earlyprintk=ttyS0, prints them before the zero).
//
// A phase's mark that the console showed (a kernel line, without
// "quiet") is placed at the line's arrival rather than at its stamp: a
// line printed at once arrives within its own few bytes' output of the
// moment it marks, whereas its stamp can lag that moment by seconds.
// Where the guest finds its sched_clock unstable ("Unstable clock
// detected"), printk stamps follow the kernel's timekeeping, which counts
// ticks until it switches to the kvm-clock late in kernel init; in the
// lab, a plain boot's stamps stood still for 1-2 s at a time while the
// console's port exits held the vCPU, and "Run /init" was stamped 5.4 s
// before it arrived (on the clock the other lines give): from the
// stamps, that much of kernel init went to /init. Marks that only the
// boot trace line gives (with "quiet") keep their stamps.
//
// It is used by `govmm run --boot-trace` and `govmm bench boot`, and is
// pure: no I/O, no goroutines.
package boottrace

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Lines the default guest prints; guestimg's tests pin them to guestproto.
const (
	ReadyLine     = "govmm-guest: ready"
	BootTraceLine = "govmm-guest: boot-trace"
)

// Kernel messages that mark phases when the console shows them (no
// "quiet"): the same ones /init reports in the boot trace line.
var kernelMarks = []struct{ key, prefix string }{
	{"unpack", "Unpacking initramfs"},
	{"unpack", "Trying to unpack rootfs image as initramfs"},
	{"unpacked", "Freeing initrd memory"},
	{"run-init", "Run /init as init process"},
}

// Line is one console line and when the VMM's side saw its end.
type Line struct {
	At   time.Time
	Text string
}

// Phases is where boot time went, in the order it passes; they add up to
// Total.
type Phases struct {
	// VMMSetup is process start to the first KVM_RUN (zero and not
	// SetupKnown when the VMM does not say, e.g. QEMU: Decompress then
	// holds the VMM's setup and firmware too).
	VMMSetup   time.Duration
	SetupKnown bool
	// Decompress is the first KVM_RUN to the kernel's clock zero: the
	// bzImage decompressor (or nothing much, with PVH) and the earliest
	// kernel setup.
	Decompress time.Duration
	// KernelInit is the kernel's clock zero to "Run /init", less Unpack.
	KernelInit time.Duration
	// Unpack is "Unpacking initramfs" to "Freeing initrd memory".
	Unpack time.Duration
	// InitToReady is "Run /init" to the ready line on the VMM's side.
	InitToReady time.Duration
	Total       time.Duration
}

// ErrNoReady means the console never showed the ready line.
var ErrNoReady = errors.New("no ready line on the console")

// Compute splits the time from start to the ready line. firstRun is zero
// when the VMM does not report its first KVM_RUN.
func Compute(start, firstRun time.Time, lines []Line) (Phases, error) {
	var (
		ready    time.Time
		zero     time.Time // the guest clock's zero on the host's
		haveZero bool
		marks    = map[string]time.Duration{} // guest time of each mark the boot trace line gives
		shown    = map[string]time.Time{}     // arrival of each mark's kernel line, where the console showed it
	)
	anchor := func(h time.Time, t time.Duration) {
		if z := h.Add(-t); !haveZero || z.Before(zero) {
			zero, haveZero = z, true
		}
	}
	for _, l := range lines {
		text := strings.TrimRight(l.Text, "\r\n")
		if strings.Contains(text, ReadyLine) && ready.IsZero() {
			ready = l.At
		}
		if i := strings.Index(text, BootTraceLine); i >= 0 {
			for _, kv := range strings.Fields(text[i+len(BootTraceLine):]) {
				k, v, ok := strings.Cut(kv, "=")
				us, err := strconv.ParseInt(v, 10, 64)
				if !ok || err != nil {
					continue
				}
				d := time.Duration(us) * time.Microsecond
				if k == "now" {
					anchor(l.At, d)
				} else {
					marks[k] = d
				}
			}
			continue
		}
		t, msg, ok := printkStamp(text)
		if !ok {
			continue
		}
		if t > 0 {
			// A line stamped zero was written before the clock
			// started (an early console prints it at once), so its
			// arrival can be before the zero: no anchor.
			anchor(l.At, t)
		}
		for _, m := range kernelMarks {
			if _, seen := shown[m.key]; !seen && strings.HasPrefix(msg, m.prefix) {
				shown[m.key] = l.At
			}
		}
	}
	if ready.IsZero() {
		return Phases{}, ErrNoReady
	}
	p := Phases{Total: ready.Sub(start)}
	if !haveZero {
		return p, fmt.Errorf("no guest time on the console (neither printk stamps nor a %q line)", BootTraceLine)
	}
	from := start
	if !firstRun.IsZero() {
		p.VMMSetup, p.SetupKnown, from = firstRun.Sub(start), true, firstRun
	}
	p.Decompress = max(zero.Sub(from), 0)
	// mark is when mark k passed on the host's clock: its line's arrival
	// where the console showed it, else its guest time from the boot
	// trace line.
	mark := func(k string) (time.Time, bool) {
		if h, ok := shown[k]; ok {
			return h, true
		}
		t, ok := marks[k]
		return zero.Add(t), ok
	}
	runInit, ok := mark("run-init")
	if !ok {
		return p, errors.New("the console does not say when /init started")
	}
	// Within zero..ready (a guest time past the ready line would be a
	// clock gone wrong).
	if runInit.Before(zero) {
		runInit = zero
	}
	if runInit.After(ready) {
		runInit = ready
	}
	if u, ok := mark("unpack"); ok {
		if done, ok := mark("unpacked"); ok {
			// The part of it between the zero and /init's start.
			in := func(h time.Time) time.Duration { return min(max(h.Sub(zero), 0), runInit.Sub(zero)) }
			p.Unpack = max(in(done)-in(u), 0)
		}
	}
	p.KernelInit = runInit.Sub(zero) - p.Unpack
	p.InitToReady = ready.Sub(runInit)
	return p, nil
}

// printkStamp splits "[   1.234567] message" into its time and message.
func printkStamp(s string) (time.Duration, string, bool) {
	s = strings.TrimLeft(s, "\x00")
	if !strings.HasPrefix(s, "[") {
		return 0, "", false
	}
	end := strings.IndexByte(s, ']')
	if end < 0 {
		return 0, "", false
	}
	secs, frac, ok := strings.Cut(strings.TrimSpace(s[1:end]), ".")
	if !ok || len(frac) != 6 {
		return 0, "", false
	}
	si, err1 := strconv.ParseInt(secs, 10, 64)
	us, err2 := strconv.ParseInt(frac, 10, 64)
	if err1 != nil || err2 != nil {
		return 0, "", false
	}
	return time.Duration(si)*time.Second + time.Duration(us)*time.Microsecond, strings.TrimSpace(s[end+1:]), true
}

// String is the breakdown on one line, in milliseconds.
func (p Phases) String() string {
	ms := func(d time.Duration) string {
		return strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 1, 64) + " ms"
	}
	setup := "vmm setup " + ms(p.VMMSetup) + ", decompression " + ms(p.Decompress)
	if !p.SetupKnown {
		setup = "setup, firmware and decompression " + ms(p.Decompress)
	}
	return fmt.Sprintf("%s to ready: %s, kernel init %s, initramfs unpack %s, /init to ready %s",
		ms(p.Total), setup, ms(p.KernelInit), ms(p.Unpack), ms(p.InitToReady))
}

// Recorder is an io.Writer for a console stream that keeps each complete
// line with the time its newline arrived. It is safe for concurrent use.
type Recorder struct {
	mu      sync.Mutex // guards partial, lines and onLine
	partial []byte
	lines   []Line
	now     func() time.Time
	// OnLine, if set, is called (under the lock; keep it short) with each
	// complete line.
	OnLine func(Line)
}

// NewRecorder returns a Recorder stamping lines with now (time.Now if nil).
func NewRecorder(now func() time.Time) *Recorder {
	if now == nil {
		now = time.Now
	}
	return &Recorder{now: now}
}

// Write implements io.Writer.
func (r *Recorder) Write(p []byte) (int, error) {
	at := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.partial = append(r.partial, p...)
	for {
		i := bytes.IndexByte(r.partial, '\n')
		if i < 0 {
			break
		}
		l := Line{At: at, Text: string(r.partial[:i])}
		r.partial = r.partial[i+1:]
		r.lines = append(r.lines, l)
		if r.OnLine != nil {
			r.OnLine(l)
		}
	}
	return len(p), nil
}

// Lines returns the complete lines so far.
func (r *Recorder) Lines() []Line {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Line(nil), r.lines...)
}

// SetupFromReport reads the VMM setup time back from a line that
// Phases.String wrote (govmm run --boot-trace's report on stderr), so
// that a benchmark running govmm as a child can place its first KVM_RUN.
func SetupFromReport(line string) (time.Duration, bool) {
	_, rest, ok := strings.Cut(line, "vmm setup ")
	if !ok {
		return 0, false
	}
	v, _, ok := strings.Cut(rest, " ms")
	f, err := strconv.ParseFloat(v, 64)
	if !ok || err != nil || f < 0 {
		return 0, false
	}
	return time.Duration(f * float64(time.Millisecond)), true
}

// StartEnv names the environment variable through which whoever starts
// govmm (govmm bench boot) can give the boot trace the moment it started
// it, in Unix nanoseconds: then the VMM setup covers exec and the Go
// runtime's start exactly (~0.1-0.2 s in the lab).
const StartEnv = "GOVMM_BOOT_TRACE_T0"

// clockTicks is USER_HZ, the unit of /proc's start times: 100 on every
// Linux architecture govmm runs on.
const clockTicks = 100

// ProcessStart says when a process started, from its /proc/PID/stat line
// (field 22, starttime: clock ticks after boot) and the clock now: now on
// the wall clock and boottime on CLOCK_BOOTTIME. It is exact to a tick
// (10 ms), never late.
func ProcessStart(stat string, now time.Time, boottime time.Duration) (time.Time, bool) {
	// The command name (field 2) is in parentheses and may hold spaces
	// or parentheses: the fields after it follow the last ')'.
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return time.Time{}, false
	}
	f := strings.Fields(stat[i+1:])
	const startField = 22 - 3 // fields 3.. follow the ')'
	if len(f) <= startField {
		return time.Time{}, false
	}
	ticks, err := strconv.ParseUint(f[startField], 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	since := boottime - time.Duration(ticks)*(time.Second/clockTicks)
	if since < 0 {
		return time.Time{}, false
	}
	return now.Add(-since), true
}
