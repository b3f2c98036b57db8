package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/guestrig"
	"govmm/internal/kvmtest"
	"govmm/internal/netns"
	"govmm/lab"
)

// The real-guest tests of govmm's command line: they boot the default
// guest (in the lab on hosts like this project's) and look at what a user
// sees: the command's bytes and status, HTTP answers, the disk's lines.

// guest is a govmm run (or restore) process booting the default guest.
type guest struct {
	cmd     *exec.Cmd
	done    chan error
	console lockedBuffer // everything the guest printed
}

// lockedBuffer is a console copy that the test reads while it grows.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// startGuest starts cmd (a govmm run) and waits for the guest's ready
// line. The console is kept in g.console and shown if the test fails.
func startGuest(t *testing.T, cmd *exec.Cmd) *guest {
	t.Helper()
	g := launchGuest(t, cmd)
	ready := make(chan struct{})
	go func() {
		// Poll the console copy for the ready line. Only its text: a
		// kernel message may land between it and its line end (CI saw
		// "govmm-guest: ready[    5.95] IPv6: ..." and waited 5 minutes).
		for {
			if strings.Contains(g.console.String(), guestimg.ReadyLine) {
				close(ready)
				return
			}
			select {
			case <-g.done:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	select {
	case <-ready:
	case <-g.done:
		t.Fatalf("guest exited before ready")
	case <-time.After(5 * time.Minute):
		t.Fatal("guest not ready within 5 minutes")
	}
	return g
}

// launchGuest starts cmd with its console copied into g.console.
func launchGuest(t *testing.T, cmd *exec.Cmd) *guest {
	t.Helper()
	g := &guest{cmd: cmd, done: make(chan error, 1)}
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	go func() {
		_, _ = io.Copy(&g.console, stdout)
		err := cmd.Wait()
		g.done <- err
		close(g.done)
	}()
	t.Cleanup(func() {
		g.kill()
		if t.Failed() {
			t.Logf("guest console (%s):\n%s", strings.Join(cmd.Args, " "), tailLines(g.console.String(), 60))
		}
	})
	return g
}

func (g *guest) kill() {
	if g.cmd.Process != nil {
		_ = syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// stop kills the VMM and waits until it is gone.
func (g *guest) stop() {
	g.kill()
	<-g.done
}

func tailLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// demoClient gives up on a request after a minute: a guest that stopped
// answering fails the test instead of hanging it.
var demoClient = &http.Client{Timeout: time.Minute}

// demo talks to the guest's demo service.
type demo struct {
	t    *testing.T
	c    *http.Client
	base string
}

func (d demo) waitHealthy() {
	d.t.Helper()
	require.Eventually(d.t, func() bool {
		resp, err := d.c.Get(d.base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 2*time.Minute, 100*time.Millisecond, "the demo service at %s never answered", d.base)
}

func (d demo) get(path string) string {
	d.t.Helper()
	resp, err := d.c.Get(d.base + path)
	require.NoError(d.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(d.t, err)
	require.Equal(d.t, http.StatusOK, resp.StatusCode, path)
	return string(b)
}

func (d demo) post(path, body string) string {
	d.t.Helper()
	resp, err := d.c.Post(d.base+path, "text/plain", strings.NewReader(body))
	require.NoError(d.t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(d.t, err)
	require.Equal(d.t, http.StatusOK, resp.StatusCode, path)
	return strings.TrimSpace(string(b))
}

func (d demo) incr() int { return atoi(d.t, d.post("/incr", "")) }

func (d demo) log() []string {
	log := strings.TrimSpace(d.get("/log"))
	if log == "" {
		return nil
	}
	return strings.Split(log, "\n")
}

// exercise drives the demo service: healthz, incr twice, append lines,
// log. It returns the log's lines.
func exercise(t *testing.T, c *http.Client, base string, lines ...string) []string {
	t.Helper()
	d := demo{t, c, base}
	d.waitHealthy()
	require.Equal(t, "ok\n", d.get("/healthz"))
	a := d.incr()
	require.Equal(t, a+1, d.incr(), "the counter goes up by one")
	for _, l := range lines {
		d.post("/append", l)
	}
	return d.log()
}

func atoi(t *testing.T, s string) int {
	var n int
	_, err := fmt.Sscan(s, &n)
	require.NoError(t, err, "not a number: %q", s)
	return n
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// blankDisk makes a sparse 64 MiB disk image.
func blankDisk(t *testing.T) string {
	disk := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(disk, nil, 0o644))
	require.NoError(t, os.Truncate(disk, 64<<20))
	return disk
}

// requireINTxRouted checks the guest's boot messages: its PCI devices'
// INTA# found their IOAPIC pin in the MP table.
func requireINTxRouted(t *testing.T, console string) {
	t.Helper()
	require.NotContains(t, console, "can't find IRQ for PCI INT")
	require.Contains(t, console, "PCI->APIC IRQ transform: INT A -> IRQ 16")
}

// hostKernelLog starts reading this host's kernel log (in the lab: L1's)
// from now on; the returned function gives the messages logged since.
// KVM reports there the guest's MSR accesses it does not handle.
func hostKernelLog(t *testing.T) func() string {
	t.Helper()
	// Raw system calls: an os.File would park a non-blocking read in the
	// poller until the next message instead of returning EAGAIN.
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	require.NoError(t, err, "read the kernel log (root needed)")
	t.Cleanup(func() { syscall.Close(fd) })
	_, err = syscall.Seek(fd, 0, io.SeekEnd)
	require.NoError(t, err)
	return func() string {
		var b strings.Builder
		buf := make([]byte, 8192) // one record per read
		for {
			n, err := syscall.Read(fd, buf)
			switch {
			case err == syscall.EPIPE:
				continue // records overwritten before we read them: go on with the next
			case err != nil || n <= 0:
				return b.String() // EAGAIN: no more records
			}
			b.Write(buf[:n])
		}
	}
}

// requireNoUnhandledMSRs checks that KVM logged no MSR access of the VMM
// process pid that it could not handle ("kvm [PID]: vcpu0, guest rIP: ...
// Unhandled WRMSR(...)").
func requireNoUnhandledMSRs(t *testing.T, kernelLog string, pid int) {
	t.Helper()
	for _, l := range strings.Split(kernelLog, "\n") {
		if strings.Contains(l, fmt.Sprintf("kvm [%d]", pid)) && strings.Contains(l, "Unhandled") {
			t.Errorf("KVM: %s", l)
		}
	}
}

// commandPayload is what run n of TestGuestCommandOutputExact prints: a
// long line and short ones, every byte value but NUL (which argv cannot
// carry), no newline at the end. Each byte is a trap to the VMM, costly in
// the lab: a few KiB.
func commandPayload(n int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "run %d\n", n)
	for c := 1; c < 256; c++ {
		b.WriteByte(byte(c))
	}
	b.WriteString("\n" + strings.Repeat("0123456789abcdef", 128) + "\n")
	for i := 0; i < 20; i++ {
		fmt.Fprintf(&b, "line %02d %s\n", i, strings.Repeat("x", i))
	}
	b.WriteString("the end, without a newline")
	return b.String()
}

// firstDiff describes where got departs from want.
func firstDiff(want, got string) string {
	i := 0
	for i < len(want) && i < len(got) && want[i] == got[i] {
		i++
	}
	return fmt.Sprintf("%d bytes wanted, %d got, first difference at byte %d (want %q, got %q)",
		len(want), len(got), i, want[i:min(i+100, len(want))], got[i:min(i+100, len(got))])
}

// govmm run -- CMD gives every byte the command wrote and its exit
// status, 20 times over (GOVMM_SOAK_RUNS: more): --cpus 1 and 2 (nproc
// says which), statuses across 0..255 and death by a signal (128+9).
func TestGuestCommandOutputExact(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	_, err := guestimg.Build(context.Background(), guestimg.Options{})
	require.NoError(t, err)
	// 20 boots; 8 in the lab, where each takes 10-29 s of the CI's hour
	// (4 while the lab ran one L1 at a time and its part of CI took up to
	// 2,270 s; two at a time, 746 s); GOVMM_SOAK_RUNS asks for more (make
	// soak).
	runs := 20
	if lab.InLab() {
		runs = 8
	}
	if n, err := strconv.Atoi(os.Getenv("GOVMM_SOAK_RUNS")); err == nil && n > 1 {
		runs = n
	}
	for n := 0; n < runs; n++ {
		cpus := 1 + n%2
		payload := commandPayload(n)
		script, status := `nproc; printf %s "$1"; exit "$2"`, n*37%256
		if n == runs-1 {
			script, status = `nproc; printf %s "$1"; kill -9 $$`, 128+9
		}
		start := time.Now()
		out, errOut, got := govmm(t, 5*time.Minute, "run", "--cpus", fmt.Sprint(cpus), "--net", "none",
			"--", "sh", "-c", script, "sh", payload, fmt.Sprint(status))
		want := fmt.Sprintf("%d\n%s", cpus, payload)
		require.Equal(t, status, got, "run %d: status; stderr: %s", n, errOut)
		require.True(t, out == want, "run %d: output: %s", n, firstDiff(want, out))
		t.Logf("run %d: --cpus %d, %d bytes, status %d, %v", n, cpus, len(out), got, time.Since(start).Round(100*time.Millisecond))
	}
}

// poweroff and reboot inside the guest end govmm with status 0, and what
// the guest printed before reaches the console, alone (the two boot side
// by side).
func TestGuestPowerOffAndReboot(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	cmds := []string{"poweroff", "reboot"}
	type result struct {
		out, errOut string
		status      int
		err         error
	}
	results := make([]result, len(cmds))
	var wg sync.WaitGroup
	for i, cmd := range cmds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			// Side by side, so neither serves the default API socket.
			r.out, r.errOut, r.status, r.err = runGovmm(5*time.Minute, "run", "--net", "none", "--api-sock", "", "--",
				"sh", "-c", "echo going down; "+cmd+"; sleep 60; echo still here")
		}()
	}
	wg.Wait()
	for i, r := range results {
		require.NoError(t, r.err, cmds[i])
		require.Equal(t, 0, r.status, "%s: %s", cmds[i], r.errOut)
		require.Equal(t, "going down\n", r.out, cmds[i])
	}
}

// The demo service answers through --publish on user-mode networking, and
// lines appended to the disk survive poweroff and a second boot. The
// second boot runs with MSI off (pci=nomsi): the virtio devices then
// interrupt through INTx, routed by the MP table. The stock guest kernel
// touches no MSR that KVM cannot handle (KVM would log it). Both boots
// show the kernel's informational messages (loglevel=7 after the
// default's quiet), which the INTx check reads. The first boot runs with
// --boot-trace, which names every phase once the guest is ready.
func TestGuestDemoUserNetAndDiskPersistence(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	disk := blankDisk(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	kernelLog := hostKernelLog(t)
	first := exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk, "--cmdline", "loglevel=7", "--boot-trace")
	var stderr lockedBuffer
	first.Stderr = io.MultiWriter(os.Stderr, &stderr)
	g := startGuest(t, first)
	lines := exercise(t, demoClient, base, "first", "second")
	require.Equal(t, []string{"first", "second"}, lines)
	requireINTxRouted(t, g.console.String())
	require.Regexp(t, `govmm: boot trace: [0-9.]+ ms to ready: vmm setup [0-9.]+ ms, decompression [0-9.]+ ms, `+
		`kernel init [0-9.]+ ms, initramfs unpack [0-9.]+ ms, /init to ready [0-9.]+ ms \(of the vmm setup: [0-9.]+ ms exec and the Go runtime's start, `+
		`[0-9.]+ ms mapping the kernel and initramfs, [0-9.]+ ms creating the machine and its devices, `+
		`[0-9.]+ ms loading the guest into memory, [0-9.]+ ms setting up the vCPUs\)`, stderr.String())
	g.stop()
	requireNoUnhandledMSRs(t, kernelLog(), g.cmd.Process.Pid)

	// A second boot on the same disk: the file system is mounted, not
	// reformatted, and the lines are still there.
	g = startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk,
		"--cmdline", "pci=nomsi loglevel=7"))
	lines = exercise(t, demoClient, base, "third")
	require.Equal(t, []string{"first", "second", "third"}, lines)
	requireINTxRouted(t, g.console.String())
	require.Contains(t, g.console.String(), "pci=nomsi", "the guest saw the option")
}

// The same through a TAP device on a Linux bridge in a network namespace.
func TestGuestDemoOverTAP(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	ns := netns.New(t)
	require.NoError(t, ns.AddTap("govmmtap0"))
	prefix := ns.BridgePrefix()
	guestIP := prefix.Addr().Next().Next() // bridge is .1
	cmd := ns.Command(govmmBin, "run", "--net", "tap:govmmtap0", "--disk", blankDisk(t),
		"--guest-ip", fmt.Sprintf("%s/%d", guestIP, prefix.Bits()), "--guest-gw", ns.BridgeIP().String())
	startGuest(t, cmd)
	lines := exercise(t, ns.HTTPClient(), "http://"+guestIP.String(), "over", "tap")
	require.Equal(t, []string{"over", "tap"}, lines)
}

// A real guest replicated from its first instruction with the default
// epoch and failover timeout: the first checkpoints of a booting Linux
// are large and the lab is slow, yet the standby never takes over its
// live primary and the primary never gives up on its standby (slow is
// not dead). The standby's disk copy starts as garbage: the initial sync
// fills it.
func TestGuestReplicatedBootNoFalseTakeover(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	dir := t.TempDir()
	disk, copyDisk := filepath.Join(dir, "disk.img"), filepath.Join(dir, "copy.img")
	require.NoError(t, os.WriteFile(disk, nil, 0o644))
	require.NoError(t, os.Truncate(disk, 64<<20))
	require.NoError(t, os.WriteFile(copyDisk, []byte("garbage"), 0o644))
	require.NoError(t, os.Truncate(copyDisk, 64<<20))
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbSock, pSock := filepath.Join(dir, "standby.sock"), filepath.Join(dir, "primary.sock")
	sbLog := &logBuffer{}
	sb := exec.Command(govmmBin, "standby", "--listen", addr, "--net", "none", "--disk", copyDisk, "--api-sock", sbSock)
	sb.Stderr = sbLog
	sb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, sb.Start())
	t.Cleanup(func() { _ = syscall.Kill(-sb.Process.Pid, syscall.SIGKILL); _ = sb.Wait() })
	require.Eventually(t, func() bool { return strings.Contains(sbLog.String(), "listening") }, time.Minute, 10*time.Millisecond)

	start := time.Now()
	startGuest(t, exec.Command(govmmBin, append([]string{"run", "--net", "none", "--disk", disk, "--api-sock", pSock, "--replicate-to", addr},
		guestrig.EpochArgs()...)...))
	t.Logf("guest ready %v after start, replicated from its first instruction", time.Since(start))
	lookup := func(name string) (float64, bool, string) {
		out, _, status := govmm(t, time.Minute, "ctl", "--api-sock", pSock, "metrics")
		require.Equal(t, 0, status)
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == name {
				var v float64
				_, err := fmt.Sscan(f[1], &v)
				require.NoError(t, err)
				return v, true, out
			}
		}
		return 0, false, out
	}
	metric := func(name string) float64 {
		v, ok, out := lookup(name)
		require.True(t, ok, "no metric %s in:\n%s", name, out)
		return v
	}
	// The guest may be ready before the initial sync (all of memory and
	// the disk) is: the replication metrics appear when it is done.
	require.Eventually(t, func() bool {
		v, ok, _ := lookup("govmm_replication_protected")
		return ok && v == 1
	}, 5*time.Minute, 500*time.Millisecond, "the primary never became protected")
	t.Logf("protected %v after start", time.Since(start))
	// Some more time of a running guest (its services start, it writes).
	e0 := metric("govmm_replication_acked_epoch")
	time.Sleep(20 * time.Second) // the scenario: the guest runs on, protected
	require.Equal(t, 1.0, metric("govmm_replication_protected"), "the primary still has its standby")
	require.Greater(t, metric("govmm_replication_acked_epoch"), e0, "checkpoints keep being acknowledged")
	info, _, status := govmm(t, time.Minute, "ctl", "--api-sock", sbSock, "info")
	require.Equal(t, 0, status, "the standby's API answers while standing by")
	require.Contains(t, info, "standing by", "the standby has not taken over")
	require.NotContains(t, sbLog.String(), "took over")
	t.Logf("epochs acked %v; backpressured %v (%.1fs in all); standby log:\n%s",
		metric("govmm_replication_acked_epoch"), metric("govmm_replication_backpressure_epochs_total"),
		metric("govmm_replication_backpressure_seconds_total"), sbLog.String())
}
