package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/netns"
	"govmm/internal/tinyguest"
)

// Host tests of --witness with tiny guests in real govmm processes
// (docs/FENCING.md): what each VMM does and says. The real-guest tests
// (guest_fencing_test.go) check what reaches the wire.

// witnessProc is a `govmm witness` on a fixed address, so that a
// restarted one is found where the old one was.
type witnessProc struct {
	t              *testing.T
	addr, key, dir string
	cmd            *exec.Cmd
	log            *logBuffer
	ns             *netns.NS // where it runs (nil: this namespace)
}

func startWitnessProc(t *testing.T, keyFile string) *witnessProc {
	t.Helper()
	w := &witnessProc{t: t, addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), key: keyFile, dir: filepath.Join(t.TempDir(), "state")}
	w.start()
	t.Cleanup(func() { w.stop() })
	return w
}

func (w *witnessProc) start() {
	w.t.Helper()
	w.log = &logBuffer{}
	args := []string{"witness", "--listen", w.addr, "--key-file", w.key, "--state", w.dir}
	if w.ns != nil {
		w.cmd = w.ns.Command(govmmBin, args...)
	} else {
		w.cmd = exec.Command(govmmBin, args...)
	}
	w.cmd.Stderr = w.log
	require.NoError(w.t, w.cmd.Start())
	require.Eventually(w.t, func() bool { return strings.Contains(w.log.String(), "listening on") }, 30*time.Second, 10*time.Millisecond)
}

// stop SIGTERMs the witness and waits (idempotent).
func (w *witnessProc) stop() {
	if w.cmd == nil {
		return
	}
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	_ = w.cmd.Wait()
	w.cmd = nil
}

// vmmProc runs a govmm VMM in its own process group, its stderr kept.
type vmmProcess struct {
	cmd  *exec.Cmd
	log  *logBuffer
	sock string
	done chan struct{}
}

func runVMM(t *testing.T, sock string, args ...string) *vmmProcess {
	t.Helper()
	p := &vmmProcess{cmd: exec.Command(govmmBin, args...), log: &logBuffer{}, sock: sock, done: make(chan struct{})}
	p.cmd.Stderr = p.log
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGCONT)
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			t.Logf("%s: stderr:\n%s", strings.Join(args[:1], " "), p.log.String())
		}
	})
	return p
}

func (p *vmmProcess) ctl(t *testing.T, args ...string) (string, string, int) {
	return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", p.sock}, args...)...)
}

// infoHas waits until ctl info contains every one of want.
func (p *vmmProcess) infoHas(t *testing.T, timeout time.Duration, want ...string) string {
	t.Helper()
	var out string
	require.Eventually(t, func() bool {
		out, _, _ = p.ctl(t, "info")
		for _, w := range want {
			if !strings.Contains(out, w) {
				return false
			}
		}
		return true
	}, timeout, 20*time.Millisecond, "ctl info at %s never had %q; last:\n%s", p.sock, want, out)
	return out
}

// fencingWorld is a witness, a standby and a primary of a tiny guest
// with --witness, all protected.
type fencingWorld struct {
	dir, key, kernel, initrd string
	w                        *witnessProc
	standby, primary         *vmmProcess
	sbAddr                   string
}

var witnessTimeouts = []string{"--failover-timeout", "1s", "--witness-lease", "500ms"}

func newFencingWorld(t *testing.T) *fencingWorld {
	t.Helper()
	kvmtest.Require(t)
	fw := &fencingWorld{dir: t.TempDir()}
	fw.key, _ = writeKey(t)
	fw.kernel, fw.initrd = tinyGuestFiles(t, fw.dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	fw.w = startWitnessProc(t, fw.key)
	fw.sbAddr = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	fw.standby = runVMM(t, filepath.Join(fw.dir, "s.sock"), append([]string{"standby", "--listen", fw.sbAddr, "--net", "none",
		"--key-file", fw.key, "--witness", fw.w.addr, "--api-sock", filepath.Join(fw.dir, "s.sock")}, witnessTimeouts...)...)
	require.Eventually(t, func() bool { return strings.Contains(fw.standby.log.String(), "listening on") }, 30*time.Second, 10*time.Millisecond)
	fw.primary = runVMM(t, filepath.Join(fw.dir, "p.sock"), append([]string{"run", "--kernel", fw.kernel, "--initrd", fw.initrd,
		"--mem", "64M", "--net", "none", "--key-file", fw.key, "--witness", fw.w.addr, "--replicate-to", fw.sbAddr,
		"--epoch", "20ms", "--api-sock", filepath.Join(fw.dir, "p.sock")}, witnessTimeouts...)...)
	waitSocket(t, fw.primary.sock)
	fw.primary.infoHas(t, 30*time.Second, "primary (protected)", "generation 1, lease valid")
	fw.standby.infoHas(t, 30*time.Second, "standing by", "failover possible (witness at generation 1)")
	require.NotContains(t, fw.primary.log.String(), "WITHOUT A WITNESS")
	return fw
}

// counterAt snapshots the VMM at sock and returns the guest's counter.
func (fw *fencingWorld) counterAt(t *testing.T, p *vmmProcess, name string) uint64 {
	t.Helper()
	snap := filepath.Join(fw.dir, name)
	_, errOut, status := p.ctl(t, "snapshot", "--out", snap)
	require.Equal(t, 0, status, errOut)
	return snapshotCounter(t, snap)
}

// A primary stopped (SIGSTOP) for longer than the failover timeout loses
// its guest to the standby, which wins generation 2 first; when it runs
// again it is FENCED: ctl info and the metrics say so, its guest never
// runs again (ctl resume refused, the counter still), ctl snapshot still
// works, and it exits with status 3.
func TestWitnessFencesStoppedPrimary(t *testing.T) {
	fw := newFencingWorld(t)
	pid := fw.primary.cmd.Process.Pid
	require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
	out := fw.standby.infoHas(t, 60*time.Second, "former standby, took over", "generation 2, lease valid")
	t.Logf("standby after the takeover:\n%s", out)
	require.Contains(t, fw.standby.log.String(), "won generation 2 at the witness")
	time.Sleep(time.Second) // the old primary stays stopped a little longer
	require.NoError(t, syscall.Kill(pid, syscall.SIGCONT))

	out = fw.primary.infoHas(t, 30*time.Second, "fenced", "FENCED: generation 2 of govmm is held by", "this VMM held generation 1")
	t.Logf("old primary after SIGCONT:\n%s", out)
	metrics, _, status := fw.primary.ctl(t, "metrics")
	require.Equal(t, 0, status)
	require.Contains(t, metrics, "govmm_witness_fenced 1")
	require.Contains(t, metrics, "govmm_witness_lease_valid 0")
	_, errOut, status := fw.primary.ctl(t, "resume")
	require.NotEqual(t, 0, status)
	require.Contains(t, errOut, "fenced")
	c1 := fw.counterAt(t, fw.primary, "f1.snap")
	time.Sleep(200 * time.Millisecond) // the scenario: time passes, and the fenced guest must not move
	require.Equal(t, c1, fw.counterAt(t, fw.primary, "f2.snap"), "a fenced primary's guest does not run")
	require.Greater(t, fw.counterAt(t, fw.standby, "s.snap"), c1, "the guest runs on at the standby")

	require.NoError(t, fw.primary.cmd.Process.Signal(syscall.SIGTERM))
	<-fw.primary.done
	require.Equal(t, fencedStatus, fw.primary.cmd.ProcessState.ExitCode())
	require.Contains(t, fw.primary.log.String(), "exiting FENCED (status 3)")
}

// The witness goes down: replication goes on, the primary holds its
// output (ctl info: lease EXPIRED), the standby says failover is
// impossible; the primary dies meanwhile, and the standby does not take
// over (it says why, and keeps its replica and claiming) until a
// restarted witness, which kept generation 1, grants it generation 2.
func TestWitnessDownNoTakeoverUntilItReturns(t *testing.T) {
	fw := newFencingWorld(t)
	fw.w.stop()
	fw.primary.infoHas(t, 30*time.Second, "primary (protected)", "lease EXPIRED: output HELD")
	fw.standby.infoHas(t, 30*time.Second, "standing by", "failover impossible until the witness answers")
	metrics, _, _ := fw.standby.ctl(t, "metrics")
	require.Contains(t, metrics, "govmm_failover_possible 0")
	require.Contains(t, metrics, "govmm_witness_reachable 0")

	require.NoError(t, syscall.Kill(-fw.primary.cmd.Process.Pid, syscall.SIGKILL))
	out := fw.standby.infoHas(t, 30*time.Second, "claiming", "failover impossible for now")
	t.Logf("standby, primary dead, witness down:\n%s", out)
	time.Sleep(3 * time.Second) // the scenario: well past the failover timeout, and still no takeover
	out, _, _ = fw.standby.ctl(t, "info")
	require.Contains(t, out, "standing by", "no takeover without the witness")
	require.Contains(t, fw.standby.log.String(), "FAILOVER IMPOSSIBLE")

	list, errOut, status := govmm(t, 10*time.Second, "witness", "--state", fw.w.dir, "--list")
	require.Equal(t, 0, status, errOut)
	require.Regexp(t, `(?m)^govmm\s+1\s+primary `, list, "the witness's state kept generation 1")
	fw.w.start()
	fw.standby.infoHas(t, 60*time.Second, "former standby, took over", "generation 2, lease valid")
	fw.w.stop()
	list, _, _ = govmm(t, 10*time.Second, "witness", "--state", fw.w.dir, "--list")
	require.Regexp(t, `(?m)^govmm\s+2\s+standby `, list)
}

// Bad input and refusals: one clear line each, and no guest runs.
func TestWitnessFlagsBadInput(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 16, counterGPA))
	key, _ := writeKey(t)
	nowhere := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	tiny := []string{"run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none"}
	for _, tt := range []struct {
		args   []string
		status int
		want   string
	}{
		{append(tiny, "--witness", nowhere), 2, "--key-file is required"},
		{append(tiny, "--witness", "nowhere", "--key-file", key), 2, `want HOST:PORT`},
		{append(tiny, "--witness", nowhere, "--key-file", key, "--witness-lease", "1ms"), 2, "--witness-lease 1ms: want 10ms to 10m0s"},
		{append(tiny, "--witness", nowhere, "--key-file", key, "--witness-lease", "100ms"), 1, "the guest is not started"},
		{[]string{"standby", "--listen", "127.0.0.1:0", "--witness", nowhere}, 2, "--key-file is required"},
	} {
		start := time.Now()
		_, errOut, status := govmm(t, 30*time.Second, tt.args...)
		require.Equal(t, tt.status, status, "%v: %s", tt.args, errOut)
		require.Contains(t, errOut, tt.want, tt.args)
		require.Less(t, time.Since(start), 10*time.Second, "%v", tt.args)
	}

	// A primary with a witness and a standby without one refuse each
	// other (and the other way round): either way one side could run the
	// guest without the witness's consent.
	w := startWitnessProc(t, key)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sb := runVMM(t, "", "standby", "--listen", addr, "--net", "none", "--key-file", key)
	require.Eventually(t, func() bool { return strings.Contains(sb.log.String(), "listening on") }, 30*time.Second, 10*time.Millisecond)
	_, errOut, status := govmm(t, time.Minute, append(tiny, "--key-file", key, "--witness", w.addr, "--replicate-to", addr)...)
	require.Equal(t, 1, status, errOut)
	require.Contains(t, errOut, "start it with --witness")
	addr2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sb2 := runVMM(t, "", "standby", "--listen", addr2, "--net", "none", "--key-file", key, "--witness", w.addr)
	require.Eventually(t, func() bool { return strings.Contains(sb2.log.String(), "listening on") }, 30*time.Second, 10*time.Millisecond)
	_, errOut, status = govmm(t, time.Minute, append(tiny, "--key-file", key, "--replicate-to", addr2)...)
	require.Equal(t, 1, status, errOut)
	require.Contains(t, errOut, "start the source with --witness")
	require.Equal(t, 1, strings.Count(errOut, "WITHOUT A WITNESS"), "the split-brain warning, once: %s", errOut)
}
