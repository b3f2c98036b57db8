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
	"govmm/internal/kvmtest"
	"govmm/internal/netns"
	"govmm/vmm"
	"govmm/vmm/container"
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
	cmd.Stderr = os.Stderr
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
	runs := 20
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
// touches no MSR that KVM cannot handle (KVM would log it).
func TestGuestDemoUserNetAndDiskPersistence(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	disk := blankDisk(t)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	kernelLog := hostKernelLog(t)
	g := startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk))
	lines := exercise(t, demoClient, base, "first", "second")
	require.Equal(t, []string{"first", "second"}, lines)
	requireINTxRouted(t, g.console.String())
	g.stop()
	requireNoUnhandledMSRs(t, kernelLog(), g.cmd.Process.Pid)

	// A second boot on the same disk: the file system is mounted, not
	// reformatted, and the lines are still there.
	g = startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk,
		"--cmdline", "pci=nomsi"))
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

// govmm ctl snapshot of a booted guest, then govmm restore: the guest
// carries on where it was. Its counter, held in guest memory, goes on
// from the value before the snapshot, and its disk log is intact and
// still grows.
func TestGuestSnapshotRestore(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	dir := t.TempDir()
	disk := blankDisk(t)
	port := freePort(t)
	d := demo{t, demoClient, fmt.Sprintf("http://127.0.0.1:%d", port)}
	ctl := func(sock string, args ...string) {
		t.Helper()
		_, errOut, status := govmm(t, 2*time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
		require.Equal(t, 0, status, "ctl %v: %s", args, errOut)
	}

	sock1 := filepath.Join(dir, "one.sock")
	g := startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk, "--api-sock", sock1))
	require.Equal(t, []string{"before the snapshot"}, exercise(t, d.c, d.base, "before the snapshot"))
	last := d.incr()
	// Paused, the guest writes nothing more to its disk: the disk file
	// matches the snapshot's memory when the VM goes away.
	ctl(sock1, "pause")
	snap := filepath.Join(dir, "guest.snap")
	ctl(sock1, "snapshot", "--out", snap)
	g.stop()

	sock2 := filepath.Join(dir, "two.sock")
	// The snapshot holds the devices (the published port, the disk):
	// restore needs no device flags, and takes flags after the file.
	launchGuest(t, exec.Command(govmmBin, "restore", snap, "--api-sock", sock2))
	d.waitHealthy()
	require.Equal(t, last+1, d.incr(), "the counter carries on from the snapshot")
	require.Equal(t, []string{"before the snapshot"}, d.log())
	d.post("/append", "after the restore")
	require.Equal(t, []string{"before the snapshot", "after the restore"}, d.log())
}

// A booted guest goes through snapshot → restore (paused, so it runs not
// one instruction) → snapshot, and the second file is the first byte for
// byte, except for these fields (snapshotStateMasked clears them in both):
//
// Clocks, which are the time at which they were read:
//   - the KVM clock (kvmclock's Clock, Realtime and HostTSC): KVM_GET_CLOCK
//     reads the guest's nanosecond clock, which runs on while vCPUs are
//     paused, and the host's clocks beside it;
//   - MSR IA32_TSC (0x10): the guest's TSC runs on in KVM while paused;
//   - the Hyper-V MSRs HV_X64_MSR_TIME_REF_COUNT (0x40000020), a reference
//     counter KVM derives from the KVM clock, and HV_X64_MSR_VP_RUNTIME
//     (0x40000010), the host CPU time of the vCPU's thread;
//   - each PIT channel's CountLoadTime: the host's ktime at which the
//     counter was (re)loaded, which KVM_SET_PIT2 sets to the time of the
//     restore;
//   - the kvmclock wall clock in guest memory (12 bytes at the GPA in
//     MSR_KVM_WALL_CLOCK_NEW): restoring that MSR makes KVM write the
//     host's current time there;
//   - the file's checksum (its end section's CRC32C), which sums the above.
//
// Two things KVM itself does not give back as it was given (both seen in
// the lab, an AMD host):
//   - bits 63:32 of MSR IA32_SYSENTER_ESP (0x175): on AMD, KVM reads the
//     whole VMCB field but a write from userspace keeps only the low 32
//     bits for a guest whose CPUID is not Intel's. SYSENTER does not exist
//     in long mode on AMD, so the guest never uses the value;
//   - VCPU_EVENTS exception.pending when exception.injected is set too:
//     without KVM_CAP_EXCEPTION_PAYLOAD, KVM_GET_VCPU_EVENTS reports a
//     pending exception as both, and KVM_SET_VCPU_EVENTS takes it back as
//     injected only; the guest gets the same exception either way.
//
// Everything else must be equal: every other register and MSR, the
// interrupt controllers, every device's state (virtio, UART, i8042, RTC)
// and every page of memory. The encoded state is checked to re-encode to
// its exact bytes, so comparing it decoded with those fields cleared is
// comparing the bytes with them masked.
func TestGuestSnapshotRoundTrip(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	dir := t.TempDir()
	disk := blankDisk(t)
	ctl := func(sock string, args ...string) string {
		t.Helper()
		out, errOut, status := govmm(t, 2*time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
		require.Equal(t, 0, status, "ctl %v: %s", args, errOut)
		return out
	}
	sock1, sock2 := filepath.Join(dir, "one.sock"), filepath.Join(dir, "two.sock")
	first, second := filepath.Join(dir, "first.snap"), filepath.Join(dir, "second.snap")

	start := time.Now()
	g := startGuest(t, exec.Command(govmmBin, "run", "--net", "none", "--disk", disk, "--api-sock", sock1))
	t.Logf("guest ready after %v", time.Since(start))
	ctl(sock1, "pause") // the disk stays as the snapshot's memory knows it
	ctl(sock1, "snapshot", "--out", first)
	g.stop()

	// The snapshot holds the devices (--net none, the disk): restore needs
	// no device flags.
	launchGuest(t, exec.Command(govmmBin, "restore", "--paused", "--api-sock", sock2, first))
	require.Eventually(t, func() bool {
		out, _, status, err := runGovmm(time.Minute, "ctl", "--api-sock", sock2, "info")
		return err == nil && status == 0 && ctlInfoState(out) == "paused"
	}, 2*time.Minute, 50*time.Millisecond, "the restored VM comes up paused")
	ctl(sock2, "snapshot", "--out", second)

	a, err := os.ReadFile(first)
	require.NoError(t, err)
	b, err := os.ReadFile(second)
	require.NoError(t, err)
	// Snapshot file (docs/FORMATS.md): a GOVMMSNP container, a state
	// section, a config section (the same devices), then page sections.
	secA, secB := snapshotSections(t, a), snapshotSections(t, b)
	stA, stB := snapshotStateMasked(t, secA[0].Payload), snapshotStateMasked(t, secB[0].Payload)
	require.Equal(t, stA, stB, "machine state apart from the clocks")
	encA, err := stA.MarshalBinary()
	require.NoError(t, err)
	encB, err := stB.MarshalBinary()
	require.NoError(t, err)
	require.True(t, bytes.Equal(encA, encB), "encoded machine state apart from the clocks")
	require.Equal(t, len(a), len(b), "file sizes")
	require.True(t, bytes.Equal(a[:container.HeaderSize], b[:container.HeaderSize]), "file header")
	wall := wallClockGPA(stA)
	require.NotZero(t, wall, "the guest registered its kvmclock wall clock")
	require.Equal(t, secA[1].Payload, secB[1].Payload, "config (the devices)")
	diffs := pageDiffs(t, secA[2:], secB[2:], wall, wall+12)
	require.Empty(t, diffs, "guest memory (page sections): bytes that differ")
	t.Logf("%d-byte snapshots equal apart from the clocks (%d bytes of state, %d page sections)", len(a), len(secA[0].Payload), len(secA)-2)

	ctl(sock2, "resume")
	require.Equal(t, "running", ctlInfoState(ctl(sock2, "info")))
}

// wallClockGPA is where the guest asked KVM for the wall clock
// (MSR_KVM_WALL_CLOCK_NEW, 0x4b564d00), 0 if it did not.
func wallClockGPA(st *vmm.MachineState) uint64 {
	for _, m := range st.VCPUs[0].MSRs {
		if m.Index == 0x4b564d00 {
			return m.Data
		}
	}
	return 0
}

// snapshotSections parses a snapshot file (checksum included) and
// returns its sections: the state, then the page sections.
func snapshotSections(t *testing.T, file []byte) []container.Section {
	t.Helper()
	_, sections, err := container.Parse(file, container.Format{
		Magic: container.MagicSnapshot, MinVersion: 3, MaxVersion: 3,
		Caps: map[container.Type]int{container.TypeState: vmm.MaxStateSize, container.TypeConfig: 1 << 20, container.TypePages: container.MaxPagesPayload},
	})
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(sections), 2)
	require.Equal(t, container.TypeState, sections[0].Type)
	require.Equal(t, container.TypeConfig, sections[1].Type)
	return sections
}

// pageDiffs walks the page sections of two snapshot files and lists the
// guest-physical ranges where they differ, outside [skipFrom, skipTo).
// The sections must hold the same pages.
func pageDiffs(t *testing.T, a, b []container.Section, skipFrom, skipTo uint64) []string {
	t.Helper()
	require.Equal(t, len(a), len(b), "page sections")
	var diffs []string
	for k := range a {
		pa, err := container.ParsePages(a[k].Payload, nil)
		require.NoError(t, err)
		pb, err := container.ParsePages(b[k].Payload, nil)
		require.NoError(t, err)
		require.Equal(t, len(pa), len(pb), "pages in section %d", k)
		for p := range pa {
			require.Equal(t, pa[p].GPA, pb[p].GPA, "section %d page %d", k, p)
			require.Equal(t, pa[p].Enc, pb[p].Enc, "page %#x", pa[p].GPA)
			gpa, x, y := pa[p].GPA, pa[p].Data, pb[p].Data
			for i := 0; i < len(x); {
				if x[i] == y[i] || (gpa+uint64(i) >= skipFrom && gpa+uint64(i) < skipTo) {
					i++
					continue
				}
				j := i
				for j < len(x) && x[j] != y[j] {
					j++
				}
				if len(diffs) < 20 {
					diffs = append(diffs, fmt.Sprintf("%#x+%d: % x → % x", gpa+uint64(i), j-i, x[i:min(j, i+16)], y[i:min(j, i+16)]))
				}
				i = j
			}
		}
	}
	return diffs
}

// ctlInfoState is the state line of 'govmm ctl info'.
func ctlInfoState(out string) string {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "state" {
			return f[1]
		}
	}
	return ""
}

// snapshotStateMasked decodes the machine state of a snapshot file (its
// state section's payload), checks that it re-encodes to the same bytes,
// and clears the fields that hold the time they were read at (see
// TestGuestSnapshotRoundTrip).
func snapshotStateMasked(t *testing.T, raw []byte) *vmm.MachineState {
	t.Helper()
	var st vmm.MachineState
	require.NoError(t, st.UnmarshalBinary(raw))
	again, err := st.MarshalBinary()
	require.NoError(t, err)
	require.True(t, bytes.Equal(raw, again), "the state re-encodes to its own bytes")
	st.Clock.Clock, st.Clock.Realtime, st.Clock.HostTSC = 0, 0, 0
	for i := range st.IRQChip.PIT.Channels {
		st.IRQChip.PIT.Channels[i].CountLoadTime = 0
	}
	for i := range st.VCPUs {
		v := &st.VCPUs[i]
		for j := range v.MSRs {
			switch v.MSRs[j].Index {
			case 0x10, 0x40000010, 0x40000020: // IA32_TSC, HV VP_RUNTIME, HV TIME_REF_COUNT
				v.MSRs[j].Data = 0
			case 0x175: // IA32_SYSENTER_ESP
				v.MSRs[j].Data &= 0xffffffff
			}
		}
		if v.Events.Exception.Injected != 0 {
			v.Events.Exception.Pending = 0
		}
	}
	return &st
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
	startGuest(t, exec.Command(govmmBin, "run", "--net", "none", "--disk", disk, "--api-sock", pSock, "--replicate-to", addr))
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
