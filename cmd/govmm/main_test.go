package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/bench"
	"govmm/ctlapi"
	"govmm/guestimg"
	"govmm/internal/boottrace"
	"govmm/internal/kvmtest"
	"govmm/vmm"
)

var govmmBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "govmm-cmd-test-")
	if err != nil {
		panic(err)
	}
	govmmBin = filepath.Join(dir, "govmm")
	// A VMM run without --api-sock serves its control API at
	// $GOVMM_API_SOCK: here, not at the host's /run/govmm, where a
	// user's VM or another checkout's tests may serve.
	os.Setenv("GOVMM_API_SOCK", filepath.Join(dir, "default.sock"))
	// scripts/guest-tests.sh builds the binary before it enters the lab,
	// where compiling would be emulated too.
	if b := os.Getenv("GOVMM_BIN"); b != "" {
		govmmBin = b
	} else if out, err := exec.Command("go", "build", "-o", govmmBin, ".").CombinedOutput(); err != nil {
		os.Stderr.Write(out)
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// govmm runs the binary and returns stdout, stderr and the exit status.
func govmm(t require.TestingT, timeout time.Duration, args ...string) (string, string, int) {
	helper(t)
	out, errOut, status, err := runGovmm(timeout, args...)
	require.NoError(t, err, "govmm %v; stderr: %s", args, errOut)
	return out, errOut, status
}

// helper marks the calling function a test helper where t can (a
// *testing.T; not the *assert.CollectT of EventuallyWithT, whose
// condition may call the same helpers).
func helper(t require.TestingT) {
	if h, ok := t.(interface{ Helper() }); ok {
		h.Helper()
	}
}

// runGovmm is govmm for any goroutine: it reports instead of failing.
func runGovmm(timeout time.Duration, args ...string) (stdout, stderr string, status int, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, govmmBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	// At the timeout, SIGQUIT first: Go prints every goroutine's stack
	// (the vCPUs', the devices') to stderr before it exits. A VM's vCPU
	// exit counters, read twice a second apart before that, tell a guest
	// that waits (halts, exits on its timer) from one that spins or is
	// stuck in KVM_RUN (lab: a guest silent for 5 min, 2026-12-04).
	//
	// Then a snapshot, for where each vCPU is: halted or running, its
	// RIP and IF, the interrupts its local APIC holds pending or in
	// service (a halted vCPU with IF set and a vector pending would be a
	// lost wake-up, not a slow guest).
	var exits string
	cmd.Cancel = func() error {
		if len(args) > 0 && args[0] == "run" {
			sock := apiSockOf(args)
			exits = vcpuExitReadings(sock) + " " + vcpuPositions(sock)
		}
		return cmd.Process.Signal(syscall.SIGQUIT)
	}
	cmd.WaitDelay = 10 * time.Second
	err = cmd.Run()
	if ctx.Err() != nil {
		o := out.String()
		return o, errb.String(), 0, fmt.Errorf("timed out after %v, with %d bytes of output, ending %q; %s", timeout, len(o), o[max(0, len(o)-200):], exits)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), errb.String(), ee.ExitCode(), nil
	}
	return out.String(), errb.String(), 0, err
}

// apiSockOf is the control socket of the VM that govmm args runs: its
// --api-sock, else $GOVMM_API_SOCK.
func apiSockOf(args []string) string {
	sock := os.Getenv("GOVMM_API_SOCK")
	for i, a := range args {
		if a == "--" {
			break
		}
		if v, ok := strings.CutPrefix(a, "--api-sock="); ok {
			sock = v
		} else if a == "--api-sock" && i+1 < len(args) {
			sock = args[i+1]
		}
	}
	return sock
}

// vcpuExitReadings reads the vCPU exit counters of the VM served at sock
// twice, a second apart, for a timed-out run's error.
func vcpuExitReadings(sock string) string {
	var b strings.Builder
	b.WriteString("vCPU exits at the timeout, then a second later:")
	for i := range 2 {
		if i > 0 {
			time.Sleep(time.Second)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		out, err := exec.CommandContext(ctx, govmmBin, "ctl", "--api-sock", sock, "metrics").Output()
		cancel()
		if err != nil {
			fmt.Fprintf(&b, " [ctl metrics: %v]", err)
			continue
		}
		for l := range strings.Lines(string(out)) {
			if strings.HasPrefix(l, "govmm_vcpu_exits_total") || strings.HasPrefix(l, "govmm_vcpu_userspace_exits_total") ||
				strings.HasPrefix(l, "govmm_vcpu_kvm_events_total") && !strings.HasSuffix(strings.TrimSpace(l), " 0") {
				b.WriteString(" " + strings.TrimSpace(l) + ";")
			}
		}
		b.WriteString(" |")
	}
	return b.String()
}

// vcpuPositions snapshots the VM served at sock and says, for each vCPU,
// its MP state, RIP, RFLAGS (IF), an interrupt being injected, and its
// local APIC's pending (IRR) and in-service (ISR) vectors, task priority
// and timer: for a timed-out run's error.
func vcpuPositions(sock string) string {
	dir, err := os.MkdirTemp("", "govmm-timeout-")
	if err != nil {
		return fmt.Sprintf("[snapshot: %v]", err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "snap")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c := ctlapi.NewClient(sock)
	defer c.Close()
	if _, err := c.Snapshot(ctx, path); err != nil {
		return fmt.Sprintf("[snapshot: %v]", err)
	}
	st, err := vmm.ReadSnapshotState(path)
	if err != nil {
		return fmt.Sprintf("[snapshot: %v]", err)
	}
	return "vCPUs at the timeout: " + st.DescribeVCPUs()
}

// tinyImage writes the bench's tiny bzImage (prints the ready line, exits
// 0 through the exit port) and a dummy initrd.
func tinyImage(t *testing.T) (kernel, initrd string) { return tinyImageOf(t, true) }

// tinyImageOf is tinyImage, with a kernel that exits or halts after its
// ready line (bench.TinyKernel).
func tinyImageOf(t *testing.T, exit bool) (kernel, initrd string) {
	dir := t.TempDir()
	kernel, initrd = filepath.Join(dir, "tiny"), filepath.Join(dir, "initrd")
	require.NoError(t, os.WriteFile(kernel, bench.TinyKernel(exit), 0o644))
	require.NoError(t, os.WriteFile(initrd, make([]byte, 512), 0o644))
	return kernel, initrd
}

// govmm run boots a kernel on real KVM, streams its console and exits
// with the guest's status.
func TestRunTinyKernel(t *testing.T) {
	kvmtest.Require(t)
	k, i := tinyImage(t)
	out, errOut, status := govmm(t, time.Minute, "run", "--kernel", k, "--initrd", i, "--net", "none")
	require.Equal(t, 0, status, errOut)
	require.Equal(t, bench.TinyReadyLine+"\n", out)
}

// A run that outlives its test's timeout is reported with what its vCPUs
// were doing (runGovmm): the exit counters (KVM's by kind among them),
// and from a snapshot each
// vCPU's state. The tiny kernel built not to exit halts after its ready
// line, so its one vCPU is found halted.
func TestRunTimeoutReportsVCPUs(t *testing.T) {
	kvmtest.Require(t)
	kernel, initrd := tinyImageOf(t, false)
	sock := filepath.Join(t.TempDir(), "api.sock")
	out, _, _, err := runGovmm(5*time.Second, "run", "--kernel", kernel, "--initrd", initrd, "--net", "none", "--api-sock", sock)
	require.Error(t, err)
	require.Equal(t, bench.TinyReadyLine+"\n", out)
	msg := err.Error()
	require.Contains(t, msg, "timed out after 5s")
	require.Regexp(t, `govmm_vcpu_exits_total\{vcpu="0"\} [1-9]`, msg)
	require.Regexp(t, `govmm_vcpu_kvm_events_total\{event="halt_exits",vcpu="0"\} [1-9]`, msg, "KVM's own count of the halt")
	require.Regexp(t, `vCPU 0: mp_state 3, rip 0x[0-9a-f]+, rflags 0x[0-9a-f]+ \(IF [01]\), cs 0x[0-9a-f]+, LAPIC irr \[`, msg)
	require.NotContains(t, msg, "[snapshot:")
	t.Log(msg)
}

// Bad input that only running shows: one clear line on stderr and exit
// status 1, never a panic. (What the command line alone shows to be wrong
// exits with status 2: TestCLIUsageErrors.)
func TestRunBadInput(t *testing.T) {
	k, i := tinyImage(t)
	base := []string{"run", "--kernel", k, "--initrd", i}
	notKernel := filepath.Join(t.TempDir(), "notkernel")
	require.NoError(t, os.WriteFile(notKernel, bytes.Repeat([]byte("x"), 4096), 0o644))
	cases := []struct {
		name   string
		args   []string
		status int
		msg    string
	}{
		{"not a bzImage", []string{"run", "--kernel", notKernel, "--initrd", i}, 1, "not a bzImage: no HdrS magic"},
		{"missing kernel", []string{"run", "--kernel", "/nonexistent/bzImage", "--initrd", i}, 1, "no such file"},
		{"memory beyond host", append(base, "--mem", "100T"), 1, "more than this host has"},
		{"missing disk", append(base, "--disk", "/nonexistent.img"), 1, "--disk /nonexistent.img"},
		{"tap name", append(base, "--net", "tap:waytoolongname12345"), 1, "tap waytoolongname12345"},
		// The tiny kernel's payload is no compressed vmlinux.
		{"no PVH kernel", append(base, "--kernel-entry", "pvh"), 1, "--kernel-entry pvh: " + k + ": no PVH kernel: bzImage has no usable compressed payload"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, errOut, status := govmm(t, time.Minute, append(c.args, "--api-sock", "")...)
			require.Equal(t, c.status, status, errOut)
			require.Contains(t, errOut, c.msg)
			requireNoTrace(t, errOut)
			require.Equal(t, 1, strings.Count(strings.TrimSpace(errOut), "\n")+1, "one line: %q", errOut)
		})
	}
}

// A vmlinux has only its PVH entry: asking for the bzImage's is an error;
// auto and pvh take it as it is.
func TestPVHKernelOfVmlinux(t *testing.T) {
	elfKernel := fileBytes{b: []byte("\x7fELF not parsed here")}
	_, err := pvhKernel("k.elf", elfKernel, "bzimage")
	require.ErrorContains(t, err, "--kernel-entry bzimage: k.elf is a vmlinux (ELF), which has only its PVH entry")
	for _, entry := range []string{"auto", "pvh"} {
		k, err := pvhKernel("k.elf", elfKernel, entry)
		require.NoError(t, err)
		require.Equal(t, elfKernel, k)
	}
}

// A damaged cache entry (here cut short, as a full disk could leave an
// older govmm's) is made again, not booted and not kept.
func TestPVHKernelRemakesDamagedEntry(t *testing.T) {
	img, err := guestimg.Build(context.Background(), guestimg.Options{})
	require.NoError(t, err)
	cache := t.TempDir()
	t.Setenv("GOVMM_CACHE", cache)
	bz, err := os.ReadFile(img.Kernel)
	require.NoError(t, err)
	k, err := pvhKernel(img.Kernel, fileBytes{b: bz}, "pvh")
	require.NoError(t, err)
	require.True(t, k.mapped)
	require.True(t, vmm.IsELF(k.b))
	want := sha256.Sum256(k.b)
	k.close()
	entries, err := filepath.Glob(filepath.Join(cache, "pvh", "*.vmlinux"))
	require.NoError(t, err)
	require.Len(t, entries, 1)
	require.NoError(t, os.Truncate(entries[0], 100))
	k, err = pvhKernel(img.Kernel, fileBytes{b: bz}, "pvh")
	require.NoError(t, err)
	defer k.close()
	require.Equal(t, want, sha256.Sum256(k.b), "the same kernel, made again")
	fi, err := os.Stat(entries[0])
	require.NoError(t, err)
	require.Equal(t, int64(len(k.b)), fi.Size(), "the entry replaced")
}

// A --publish port that is taken fails before the guest boots.
func TestRunPublishPortTaken(t *testing.T) {
	kvmtest.Require(t)
	k, i := tinyImage(t)
	l, err := netListen()
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*netTCPAddr).Port
	_, errOut, status := govmm(t, time.Minute, "run", "--kernel", k, "--initrd", i, "--publish", itoa(port)+":80")
	require.Equal(t, 1, status)
	require.Contains(t, errOut, "address already in use")
}

// An installed govmm (a binary outside the checkout, run from another
// directory) builds the default image: the guest programs' sources are in
// the binary. The fresh cache holds the downloaded packages (and their
// unpacked part), so only what needed the source tree is built again, and
// it comes out as the image the checkout's tests use.
func TestInstalledBinaryBuildsImage(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	want, err := guestimg.Build(t.Context(), guestimg.Options{})
	require.NoError(t, err)
	cache := t.TempDir()
	for _, dir := range []string{"debs", "parts"} {
		linkTree(t, filepath.Join(guestimg.DefaultCacheDir(), dir), filepath.Join(cache, dir))
	}
	elsewhere := t.TempDir()
	cmd := exec.Command(govmmBin, "image", "build", "--print")
	cmd.Dir = elsewhere
	cmd.Env = append(os.Environ(), "GOVMM_CACHE="+cache)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	require.NoError(t, cmd.Run(), errOut.String())
	paths := strings.Split(strings.TrimSpace(out.String()), "\n")
	require.Len(t, paths, 3, out.String())
	require.Equal(t, filepath.Join(cache, "images", filepath.Base(filepath.Dir(want.Kernel)), "vmlinuz"), paths[0],
		"the same image key as the checkout's build")
	require.Equal(t, filepath.Join(filepath.Dir(paths[0]), "vmlinux"), paths[2], "the vmlinux beside the bzImage")
	gotVmlinux, err := os.ReadFile(paths[2])
	require.NoError(t, err)
	wantVmlinux, err := os.ReadFile(want.Vmlinux)
	require.NoError(t, err)
	require.True(t, bytes.Equal(wantVmlinux, gotVmlinux), "the same vmlinux, byte for byte")
	got, err := os.ReadFile(paths[1])
	require.NoError(t, err)
	wantInitrd, err := os.ReadFile(want.Initrd)
	require.NoError(t, err)
	require.True(t, bytes.Equal(wantInitrd, got), "the same initrd, byte for byte")
	require.Contains(t, errOut.String(), "built guest programs")
}

// linkTree hard-links (or copies) the files of src into dst.
func linkTree(t *testing.T, src, dst string) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		if os.Link(p, target) == nil {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(target, b, 0o644)
	}))
}

// A flag that a command would ignore is refused, and says why; it stays
// out of that command's help.
func TestFlagsThatDoNotApplyAreRefused(t *testing.T) {
	snap := filepath.Join(t.TempDir(), "vm.snap") // never read: the flags are refused first
	cases := []struct {
		args []string
		msg  string
	}{
		{[]string{"restore", "--guest-ip", "10.0.0.2/24", snap}, "the snapshot holds the guest's kernel, memory, vCPUs and network settings"},
		{[]string{"restore", "--guest-gw", "10.0.0.1", snap}, "does not apply to restore"},
		{[]string{"restore", "--mem", "1G", snap}, "does not apply to restore"},
		{[]string{"restore", "--replicate-to", "127.0.0.1:7000", snap}, "'govmm ctl replicate --to HOST:PORT' once it runs"},
		{[]string{"restore", "--epoch", "50ms", snap}, "does not apply to restore"},
		{[]string{"restore", "--witness", "127.0.0.1:7001", snap}, "does not apply to restore"},
		{[]string{"standby", "--listen", "127.0.0.1:0", "--guest-gw", "10.0.0.1"}, "come from the primary"},
		{[]string{"standby", "--listen", "127.0.0.1:0", "--kernel", "/boot/vmlinuz"}, "does not apply to standby"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			_, errOut, status := govmm(t, time.Minute, c.args...)
			require.Equal(t, 2, status, errOut)
			require.Contains(t, errOut, c.msg)
			require.NotContains(t, errOut, "panic")
		})
	}
	for cmd, refused := range map[string][]string{
		"restore": {"guest-ip", "guest-gw", "replicate-to", "epoch", "witness", "mem", "cpus", "kernel"},
		"standby": {"guest-gw", "kernel", "mem"},
	} {
		out, errOut, status := govmm(t, time.Minute, "help", cmd)
		require.Equal(t, 0, status)
		for _, name := range refused {
			require.NotContains(t, out+errOut, "-"+name+" ", "govmm help %s", cmd)
		}
	}
	// Flags that what a command was asked to do would ignore.
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"witness", "--state", t.TempDir(), "--list", "--listen", "127.0.0.1:7100"}, "witness: --listen does not apply with --list"},
		{[]string{"bench", "--out", t.TempDir(), "--mem", "512", "checkpoint"}, "bench: --mem does not apply without the boot suite"},
		{[]string{"bench", "--out", t.TempDir(), "--modes", "sigkill", "checkpoint"}, "bench: --modes does not apply without the failover-guest suite"},
		{[]string{"bench", "--out", t.TempDir(), "--modes", "kill", "failover-guest"}, `--modes kill: unknown failure "kill"`},
		{[]string{"bench", "--out", t.TempDir(), "--witness", "maybe", "failover-guest"}, "--witness maybe: want without, with or both"},
		{[]string{"bench", "--out", t.TempDir(), "--witness", "with", "failover"}, "bench: --witness does not apply without the failover-guest suite"},
	} {
		_, errOut, status := govmm(t, time.Minute, c.args...)
		require.Equal(t, usageStatus, status, errOut)
		require.Contains(t, errOut, c.msg)
	}
	// What run and standby take, their help shows.
	out, errOut, _ := govmm(t, time.Minute, "help", "run")
	require.Contains(t, out+errOut, "-guest-gw")
	out, errOut, _ = govmm(t, time.Minute, "help", "standby")
	require.Contains(t, out+errOut, "-guest-ip")
}

// The boot trace's process start is the kernel's record of this process's
// start, before the package's own init, and $GOVMM_BOOT_TRACE_T0 when
// whoever started govmm gives it.
//
// The test binary may have run for minutes when it gets here (in the lab
// cmd/govmm's tests reach it after 5-6): startTime would then, rightly,
// not believe the record and say now, so the test allows an hour.
func TestStartTime(t *testing.T) {
	const maxAge = time.Hour
	got := startTimeWithin(maxAge)
	// The kernel's record is to a tick (10 ms) and never late; exec and
	// the Go runtime's start took up to 5.7 s for this big test binary in
	// the lab; the boot is further back (a lab L1 is up after ~5 s, and
	// starts the tests after that).
	require.False(t, got.After(initAt), "a start before the package's init (%v after it)", got.Sub(initAt))
	require.Less(t, initAt.Sub(got), time.Minute, "this process's start")
	var ts unix.Timespec
	require.NoError(t, unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts))
	bootAt := time.Now().Add(-time.Duration(ts.Nano()))
	require.Greater(t, got.Sub(bootAt), time.Second, "this process's start, not the boot's")
	t0 := time.Now().Add(-1234 * time.Millisecond).Round(0)
	t.Setenv(boottrace.StartEnv, strconv.FormatInt(t0.UnixNano(), 10))
	require.True(t, t0.Equal(startTimeWithin(maxAge)), "the start its parent gave")
	t.Setenv(boottrace.StartEnv, "garbage")
	require.WithinDuration(t, got, startTimeWithin(maxAge), time.Millisecond, "the kernel's record again")
}
