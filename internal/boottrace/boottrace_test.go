package boottrace

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var t0 = time.Date(2026, 12, 1, 4, 0, 0, 0, time.UTC)

func at(ms float64) time.Time { return t0.Add(time.Duration(ms * float64(time.Millisecond))) }

func ms(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }

// A quiet boot: the console shows no kernel line, only /init's trace line
// and the ready line. Process start at 0, first KVM_RUN at 20 ms, the
// guest clock's zero at 500 ms (the trace line's now=3000 ms arrives at
// 3500 ms).
func TestComputeQuiet(t *testing.T) {
	lines := []Line{
		{at(3500), "govmm-guest: boot-trace unpack=800000 unpacked=1000000 run-init=2000000 now=3000000\r"},
		{at(3501), "govmm-guest: ready\r"},
	}
	p, err := Compute(t0, at(20), lines)
	require.NoError(t, err)
	assert.Equal(t, Phases{VMMSetup: ms(20), SetupKnown: true, Decompress: ms(480), KernelInit: ms(1800),
		Unpack: ms(200), InitToReady: ms(1001), Total: ms(3501)}, p)
	assert.Equal(t, p.Total, p.VMMSetup+p.Decompress+p.KernelInit+p.Unpack+p.InitToReady, "the phases add up")
}

// A boot with the kernel's messages on the console (no quiet) and no
// trace line (another init): the marks and the clock's zero come from the
// printk stamps. Lines the kernel buffered before the console came up
// arrive late; the earliest h - t wins.
func TestComputeFromKernelLines(t *testing.T) {
	lines := []Line{
		{at(900), "[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)"}, // buffered: h-t = 900
		{at(900), "[    0.120000] Calibrating delay loop (skipped) preset value.. 4000.00 BogoMIPS (lpj=8000000)"},
		{at(1010), "[    0.400000] Trying to unpack rootfs image as initramfs..."}, // h-t = 610
		{at(1310), "[    0.700000] Freeing initrd memory: 17724K"},
		{at(1800), "[    1.190000] Run /init as init process"}, // h-t = 610
		{at(1805), "[    1.195000]   with arguments:"},
		{at(2600), "govmm-guest: ready"},
	}
	p, err := Compute(t0, time.Time{}, lines)
	require.NoError(t, err)
	assert.False(t, p.SetupKnown)
	assert.Equal(t, ms(610), p.Decompress, "QEMU: setup, firmware and decompression together")
	assert.Equal(t, ms(300), p.Unpack)
	assert.Equal(t, ms(890), p.KernelInit)
	assert.Equal(t, ms(2600)-ms(610)-ms(1190), p.InitToReady)
	assert.Equal(t, ms(2600), p.Total)
	assert.Contains(t, p.String(), "2600.0 ms to ready: setup, firmware and decompression 610.0 ms, kernel init 890.0 ms")
}

// With an early console (earlyprintk=ttyS0) the lines stamped zero,
// written before the printk clock starts, reach the console before the
// clock's zero: they must not pull the zero early (here the banner
// arrives at 700 ms, the clock starts at 900 ms).
func TestComputeEarlyConsole(t *testing.T) {
	lines := []Line{
		{at(700), "[    0.000000] Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org)"},
		{at(880), "[    0.000000] kvm-clock: Using msrs 4b564d01 and 4b564d00"},
		{at(910), "[    0.000198] kvm-clock: using sched offset of 699902695 cycles"}, // h-t ≈ 910
		{at(960), "[    0.059917] tsc: Detected 2596.104 MHz processor"},              // h-t = 900
		{at(2000), "[    1.100000] Run /init as init process"},
		{at(2500), "govmm-guest: ready"},
	}
	p, err := Compute(t0, at(300), lines)
	require.NoError(t, err)
	assert.Equal(t, ms(600), p.Decompress, "first KVM_RUN at 300 ms to the clock's zero at 900 ms")
	assert.Equal(t, ms(1100), p.KernelInit)
	assert.Equal(t, ms(500), p.InitToReady)
}

func TestComputeErrors(t *testing.T) {
	_, err := Compute(t0, at(1), []Line{{at(5), "[    0.100000] Run /init as init process"}})
	require.ErrorIs(t, err, ErrNoReady)

	p, err := Compute(t0, at(1), []Line{{at(5), "govmm-guest: ready"}})
	require.Error(t, err, "no guest time")
	assert.Equal(t, ms(5), p.Total, "the total is known all the same")

	_, err = Compute(t0, at(1), []Line{{at(4), "govmm-guest: boot-trace now=1000"}, {at(5), "govmm-guest: ready"}})
	require.ErrorContains(t, err, "/init")
}

func TestPrintkStamp(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"[    1.234567] x":     ms(1234.567),
		"[12345.000001] x":     12345*time.Second + time.Microsecond,
		"\x00[    0.000000] x": 0,
	} {
		d, msg, ok := printkStamp(in)
		require.True(t, ok, in)
		assert.Equal(t, want, d, in)
		assert.Equal(t, "x", msg)
	}
	for _, in := range []string{"", "govmm-guest: ready", "[ 1.2] short fraction", "[abc.123456] x", "[ 1.234567 no bracket"} {
		_, _, ok := printkStamp(in)
		assert.False(t, ok, in)
	}
}

func TestRecorder(t *testing.T) {
	clock := t0
	r := NewRecorder(func() time.Time { return clock })
	var seen []string
	r.OnLine = func(l Line) { seen = append(seen, l.Text) }
	fmt.Fprint(r, "partial ")
	clock = at(7)
	fmt.Fprint(r, "line\nsecond\nthi")
	clock = at(9)
	fmt.Fprint(r, "rd\n")
	assert.Equal(t, []Line{{at(7), "partial line"}, {at(7), "second"}, {at(9), "third"}}, r.Lines())
	assert.Equal(t, "partial line|second|third", strings.Join(seen, "|"))
}

func TestSetupFromReport(t *testing.T) {
	p := Phases{VMMSetup: ms(12.3), SetupKnown: true, Decompress: ms(400), Total: ms(1000)}
	d, ok := SetupFromReport("govmm: boot trace: " + p.String())
	require.True(t, ok)
	assert.Equal(t, ms(12.3), d)
	_, ok = SetupFromReport("govmm: boot trace: 1.0 ms to ready: setup, firmware and decompression 1.0 ms")
	assert.False(t, ok)
}

// The console of a PVH boot of the default guest in the lab (not quiet),
// as govmm run printed it. Each line is given the arrival time of its
// printk stamp plus one second (the guest clock's zero at 1 s after the
// first KVM_RUN); lines without a stamp arrive with the last stamped one.
func TestComputeCapturedConsole(t *testing.T) {
	text, err := os.ReadFile("testdata/console-pvh-lab.txt")
	require.NoError(t, err)
	var lines []Line
	last := time.Duration(0)
	for _, l := range strings.Split(strings.TrimRight(string(text), "\n"), "\n") {
		if d, _, ok := printkStamp(l); ok {
			last = d
		}
		if strings.HasPrefix(l, BootTraceLine) {
			last = 17308540 * time.Microsecond // its now=
		}
		lines = append(lines, Line{At: at(1000).Add(last), Text: l})
	}
	p, err := Compute(t0, at(20), lines)
	require.NoError(t, err)
	assert.Equal(t, ms(20), p.VMMSetup)
	assert.Equal(t, ms(980), p.Decompress)
	assert.Equal(t, time.Duration(12552694-12096175)*time.Microsecond, p.Unpack, "Unpacking initramfs to Freeing initrd memory")
	assert.Equal(t, time.Duration(14726817)*time.Microsecond-p.Unpack, p.KernelInit)
	assert.Equal(t, time.Duration(17308540-14726817)*time.Microsecond, p.InitToReady)
	assert.Equal(t, p.Total, p.VMMSetup+p.Decompress+p.KernelInit+p.Unpack+p.InitToReady)
}

func TestProcessStart(t *testing.T) {
	// A /proc/PID/stat line of a process started 1234.56 s after boot,
	// whose name holds a space and a parenthesis.
	stat := "4242 (gov mm) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 9 0 123456 26331020 1200 18446744073709551615"
	now := at(0)
	got, ok := ProcessStart(stat, now, 1240*time.Second)
	require.True(t, ok)
	assert.Equal(t, now.Add(-5440*time.Millisecond), got, "1240 s - 1234.56 s before now")

	_, ok = ProcessStart(stat, now, time.Second)
	assert.False(t, ok, "a start after now")
	for _, bad := range []string{"", "4242 (govmm", "4242 (govmm) S 1 2", "4242 (govmm) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 9 0 x"} {
		_, ok := ProcessStart(bad, now, 1240*time.Second)
		assert.False(t, ok, bad)
	}
}

// The console of a plain boot (no quiet, PVH) of the default guest in the
// lab, each line with the time it arrived (seconds after govmm started,
// as read from its output). The guest's sched_clock was unstable there
// ("Unstable clock detected"), and its printk stamps stood still while
// the console printed: "Trying to unpack rootfs", "Freeing initrd
// memory" and "Run /init" are all stamped 7.899823 s, arriving at 12.687,
// 13.193 and 14.565 s, 5.4 s after that stamp on the clock the other
// lines give. The marks are where their lines arrived; from the stamps,
// /init to ready came out 6.0 s (it took 0.58 s) and the unpack nothing.
func TestComputeUnstableGuestClock(t *testing.T) {
	text, err := os.ReadFile("testdata/console-plain-lab-unstable.txt")
	require.NoError(t, err)
	var lines []Line
	for _, l := range strings.Split(strings.TrimRight(string(text), "\n"), "\n") {
		secs, msg, ok := strings.Cut(l, "\t")
		require.True(t, ok, l)
		var s float64
		_, err := fmt.Sscan(secs, &s)
		require.NoError(t, err, l)
		lines = append(lines, Line{At: at(s * 1000), Text: msg})
	}
	// The times are on the reading process's clock, which started 1.73 s
	// after govmm (perl, loaded from L1's 9p root): govmm's own report
	// had the first KVM_RUN 384 ms before the clock's zero.
	zero := at(7631).Add(-6384317 * time.Microsecond)
	firstRun := zero.Add(-384 * time.Millisecond)
	p, err := Compute(t0, firstRun, lines)
	require.NoError(t, err)
	assert.Equal(t, ms(15148-14565), p.InitToReady, "the ready line's arrival less Run /init's")
	assert.Equal(t, ms(13193-12687), p.Unpack, "Freeing initrd memory's arrival less Trying to unpack's")
	// The clock's zero: "console [ttyS0] enabled", stamped 6.384317 s,
	// arrived at 7.631 s (the smallest arrival less stamp).
	assert.Equal(t, ms(384), p.Decompress)
	assert.Equal(t, at(14565).Sub(zero)-p.Unpack, p.KernelInit)
	assert.Equal(t, ms(15148), p.Total)
	assert.Equal(t, p.Total, p.VMMSetup+p.Decompress+p.KernelInit+p.Unpack+p.InitToReady, "the phases add up")
}

// Marks out of order (the unpack's end shown after Run /init) are
// bounded: the unpack is cut at /init's start, and the phases still add up.
func TestComputeMarksOutOfOrder(t *testing.T) {
	lines := []Line{
		{at(1000), "[    0.500000] Trying to unpack rootfs image as initramfs..."},
		{at(1200), "[    0.700000] Run /init as init process"},
		{at(1500), "[    0.700000] Freeing initrd memory: 17724K"},
		{at(1600), "govmm-guest: ready"},
	}
	p, err := Compute(t0, at(100), lines)
	require.NoError(t, err)
	assert.Equal(t, ms(400), p.Decompress)
	assert.Equal(t, ms(200), p.Unpack, "cut at Run /init: 1000 to 1200 ms")
	assert.Equal(t, ms(500), p.KernelInit, "the zero (500 ms) to Run /init, less the unpack")
	assert.Equal(t, ms(400), p.InitToReady)
	assert.Equal(t, p.Total, p.VMMSetup+p.Decompress+p.KernelInit+p.Unpack+p.InitToReady)
}
