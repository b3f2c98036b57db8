package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

// govmm run --replicate-to keeps a govmm standby in step; the primary is
// SIGKILLed; the standby takes over from its last checkpoint and the
// guest's counter carries on there, past every value the primary showed
// before it died.
func TestReplicateAndFailover(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 256, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}

	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	sbSock := filepath.Join(dir, "standby.sock")
	sbLog := &logBuffer{}
	sb := exec.Command(govmmBin, "standby", "--listen", addr, "--net", "none", "--api-sock", sbSock, "--failover-timeout", "1s")
	sb.Stderr = sbLog
	sb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, sb.Start())
	t.Cleanup(func() { _ = syscall.Kill(-sb.Process.Pid, syscall.SIGKILL); _ = sb.Wait() })
	waitStandingBy(t, sbSock)

	pSock := filepath.Join(dir, "primary.sock")
	prim, primLog := startVMLogged(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", pSock, "--replicate-to", addr, "--epoch", "20ms", "--failover-timeout", "1s")
	waitSocket(t, pSock)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(pSock, "info")
		return strings.Contains(out, "protected")
	}, 30*time.Second, 50*time.Millisecond)
	// The initial sync's progress, as a log reads it (stderr is no
	// terminal): what was copied, in how long, at what rate.
	syncLine := regexp.MustCompile(`govmm: initial sync: \d+(\.\d+)? MiB in \S+ \(\d+(\.\d+)? [KMG]iB/s\)`)
	require.Eventually(t, func() bool { return syncLine.MatchString(primLog.String()) }, 30*time.Second, 10*time.Millisecond,
		"no initial sync line")
	metrics, _, status := ctl(pSock, "metrics")
	require.Equal(t, 0, status)
	require.Contains(t, metrics, "govmm_replication_protected 1")

	before := filepath.Join(dir, "before.snap")
	_, errOut, status := ctl(pSock, "snapshot", "--out", before)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, before)
	waitAckedPast(t, pSock) // the standby holds a checkpoint from after the snapshot

	killed := time.Now()
	require.NoError(t, syscall.Kill(-prim.Process.Pid, syscall.SIGKILL))
	waitGuestHere(t, sbSock)
	t.Logf("standby answering %v after SIGKILL", time.Since(killed))
	after := filepath.Join(dir, "after.snap")
	_, errOut, status = ctl(sbSock, "snapshot", "--out", after)
	require.Equal(t, 0, status, errOut)
	require.Greater(t, snapshotCounter(t, after), c0, "the guest carries on at the standby from a checkpoint after the snapshot")
	require.Contains(t, sbLog.String(), "took over at checkpoint")
}

// Re-protection: the standby that took over replicates the guest to a
// new standby at once; when it dies in turn, the third host carries on.
//
// Once with the default stream, once with S2 and XOR deltas on all three
// (each new stream, B's to C after the failover, starts from whole
// pages).
func TestReprotectAndFailOverAgain(t *testing.T) {
	for _, tt := range []struct {
		name  string
		flags []string
	}{
		{"default stream", nil},
		{"s2 and deltas", []string{"--stream-compress", "s2", "--stream-deltas"}},
	} {
		t.Run(tt.name, func(t *testing.T) { testReprotectAndFailOverAgain(t, tt.flags) })
	}
}

func testReprotectAndFailOverAgain(t *testing.T, stream []string) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	addrB := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	addrC := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sockA, sockB, sockC := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock"), filepath.Join(dir, "c.sock")

	startVM(t, append([]string{"standby", "--listen", addrC, "--net", "none", "--api-sock", sockC}, stream...)...)
	b := startVM(t, append([]string{"standby", "--listen", addrB, "--net", "none", "--api-sock", sockB, "--replicate-to", addrC, "--epoch", "20ms"}, stream...)...)
	waitStandingBy(t, sockC)
	waitStandingBy(t, sockB)
	a := startVM(t, append([]string{"run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", sockA, "--replicate-to", addrB, "--epoch", "20ms"}, stream...)...)
	waitSocket(t, sockA)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sockA, "info")
		return strings.Contains(out, "protected")
	}, 30*time.Second, 50*time.Millisecond)
	snap := filepath.Join(dir, "a.snap")
	_, errOut, status := ctl(sockA, "snapshot", "--out", snap)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, snap)
	waitAckedPast(t, sockA)

	require.NoError(t, syscall.Kill(-a.Process.Pid, syscall.SIGKILL))
	waitGuestHere(t, sockB)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sockB, "info")
		return strings.Contains(out, "primary (protected)")
	}, 30*time.Second, 50*time.Millisecond, "B protects the guest with C")
	snapB := filepath.Join(dir, "b.snap")
	_, errOut, status = ctl(sockB, "snapshot", "--out", snapB)
	require.Equal(t, 0, status, errOut)
	c1 := snapshotCounter(t, snapB)
	require.Greater(t, c1, c0)
	waitAckedPast(t, sockB)

	require.NoError(t, syscall.Kill(-b.Process.Pid, syscall.SIGKILL))
	waitGuestHere(t, sockC)
	snapC := filepath.Join(dir, "c.snap")
	_, errOut, status = ctl(sockC, "snapshot", "--out", snapC)
	require.Equal(t, 0, status, errOut)
	require.Greater(t, snapshotCounter(t, snapC), c1, "the guest carries on at the third host")
}

// Replication started and stopped through the control API; losing the
// standby leaves the primary running, unprotected, and saying so.
func TestCtlReplicateStandbyLoss(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	sock := filepath.Join(dir, "p.sock")
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock, "--epoch", "20ms")
	waitSocket(t, sock)
	out, _, _ := ctl(sock, "info")
	require.NotContains(t, out, "protected")

	addr1 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sb1Sock := filepath.Join(dir, "s1.sock")
	sb1 := startVM(t, "standby", "--listen", addr1, "--net", "none", "--api-sock", sb1Sock)
	waitStandingBy(t, sb1Sock)
	out, errOut, status := ctl(sock, "replicate", "--to", addr1)
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "protected by")
	// The client saw the initial sync's progress: all 64 MiB of memory,
	// and the rounds of pages the guest dirtied meanwhile.
	require.Regexp(t, `^govmm: initial sync: \d+(\.\d+)? MiB in \S+ \(\d+(\.\d+)? [KMG]iB/s\)\n$`, errOut)
	out, _, _ = ctl(sock, "info")
	require.Contains(t, out, "primary (protected)")
	_, errOut, status = ctl(sock, "replicate", "--to", addr1)
	require.NotEqual(t, 0, status, "a second replicate is a conflict")
	require.Contains(t, errOut, "already replicating")

	// The standby dies: the primary carries on, unprotected, and says so.
	require.NoError(t, syscall.Kill(-sb1.Process.Pid, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sock, "metrics")
		return strings.Contains(out, "govmm_replication_protected 0")
	}, 30*time.Second, 50*time.Millisecond)
	out, _, _ = ctl(sock, "info")
	require.Contains(t, out, "UNPROTECTED")
	s1, s2 := filepath.Join(dir, "1.snap"), filepath.Join(dir, "2.snap")
	_, errOut, status = ctl(sock, "snapshot", "--out", s1)
	require.Equal(t, 0, status, errOut)
	c1 := snapshotCounter(t, s1)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, sock, s2), c1)
	}, 30*time.Second, 20*time.Millisecond, "the guest keeps running")

	// Protected again by a new standby, then replication stopped: that
	// standby discards its replica and exits without running the guest.
	addr2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sb2Sock := filepath.Join(dir, "s2.sock")
	sb2 := exec.Command(govmmBin, "standby", "--listen", addr2, "--net", "none", "--api-sock", sb2Sock)
	var sb2Err logBuffer
	sb2.Stderr = &sb2Err
	require.NoError(t, sb2.Start())
	t.Cleanup(func() { _ = sb2.Process.Kill(); _ = sb2.Wait() })
	waitStandingBy(t, sb2Sock)
	_, errOut, status = ctl(sock, "replicate", "--to", addr2)
	require.Equal(t, 0, status, errOut)
	_, errOut, status = ctl(sock, "unreplicate")
	require.Equal(t, 0, status, errOut)
	werr := make(chan error, 1)
	go func() { werr <- sb2.Wait() }()
	select {
	case err := <-werr:
		require.Error(t, err, "the standby exits with an error status")
	case <-time.After(30 * time.Second):
		t.Fatal("standby still running after replication stopped")
	}
	require.Contains(t, sb2Err.String(), "replica is discarded")
}

// The standby that took over re-protects the guest with --replicate-to;
// when that standby cannot be reached, the guest just taken over keeps
// running, unprotected, and the standby says so loudly.
func TestReprotectFailureKeepsGuestRunning(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	addrB := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	nowhere := fmt.Sprintf("127.0.0.1:%d", freePort(t)) // nothing listens there
	sockA, sockB := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	bLog := &logBuffer{}
	b := exec.Command(govmmBin, "standby", "--listen", addrB, "--net", "none", "--api-sock", sockB, "--replicate-to", nowhere)
	b.Stderr = bLog
	b.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, b.Start())
	t.Cleanup(func() { _ = syscall.Kill(-b.Process.Pid, syscall.SIGKILL); _ = b.Wait() })
	require.Eventually(t, func() bool { return strings.Contains(bLog.String(), "listening") }, 30*time.Second, 10*time.Millisecond)
	a := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", sockA, "--replicate-to", addrB, "--epoch", "20ms")
	waitSocket(t, sockA)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sockA, "info")
		return strings.Contains(out, "primary (protected)")
	}, 30*time.Second, 50*time.Millisecond)
	require.NoError(t, syscall.Kill(-a.Process.Pid, syscall.SIGKILL))

	waitGuestHere(t, sockB)
	require.Eventually(t, func() bool { return strings.Contains(bLog.String(), "UNPROTECTED") }, 30*time.Second, 10*time.Millisecond)
	out, errOut, status := ctl(sockB, "info")
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "took over")
	s1, s2 := filepath.Join(dir, "1.snap"), filepath.Join(dir, "2.snap")
	_, errOut, status = ctl(sockB, "snapshot", "--out", s1)
	require.Equal(t, 0, status, errOut)
	c1 := snapshotCounter(t, s1)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, sockB, s2), c1)
	}, 30*time.Second, 50*time.Millisecond, "the taken-over guest keeps running")
}

// A standby whose machine could not run the primary's guest (here its
// disk copy is smaller, then offers discard where the primary's does not)
// refuses the primary at the handshake: the primary
// says why and exits before claiming protection, the standby says why and
// keeps listening, undisturbed also by connections that are no primary,
// and then protects a primary it can run.
func TestStandbyRefusesUnfitPrimary(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	disk := func(name string, size int) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, make([]byte, size), 0o644))
		return p
	}
	copyDisk, small, big := disk("copy.img", 1<<20), disk("small.img", 1<<20), disk("big.img", 2<<20)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbLog := &logBuffer{}
	sb := exec.Command(govmmBin, "standby", "--listen", addr, "--net", "none", "--disk", copyDisk)
	sb.Stderr = sbLog
	sb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, sb.Start())
	t.Cleanup(func() { _ = syscall.Kill(-sb.Process.Pid, syscall.SIGKILL); _ = sb.Wait() })
	require.Eventually(t, func() bool { return strings.Contains(sbLog.String(), "listening") }, 30*time.Second, 10*time.Millisecond)

	c, err := net.Dial("tcp", addr) // a connect-and-close
	require.NoError(t, err)
	c.Close()
	_, errOut, status := govmm(t, time.Minute, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--disk", big, "--replicate-to", addr)
	require.Equal(t, 1, status)
	require.Contains(t, errOut, `device virtio-blk0: size "1048576" on the standby, "2097152" on the source`)
	require.Eventually(t, func() bool { return strings.Count(sbLog.String(), "refused") >= 2 }, 30*time.Second, 10*time.Millisecond)
	require.Contains(t, sbLog.String(), "size")
	// Same size, but the guest would be offered discard on the primary and
	// not after a takeover (or the copy kept allocated on one side only).
	_, errOut, status = govmm(t, time.Minute, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--disk", small+",nodiscard", "--replicate-to", addr)
	require.Equal(t, 1, status)
	require.Contains(t, errOut, `device virtio-blk0: discard "true" on the standby, "false" on the source`)
	require.Eventually(t, func() bool { return strings.Count(sbLog.String(), "refused") >= 3 }, 30*time.Second, 10*time.Millisecond)
	require.Nil(t, sb.ProcessState, "the standby keeps listening")

	sock := filepath.Join(dir, "p.sock")
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--disk", small, "--api-sock", sock, "--replicate-to", addr)
	waitSocket(t, sock)
	require.Eventually(t, func() bool {
		out, _, _ := govmm(t, time.Minute, "ctl", "--api-sock", sock, "info")
		return strings.Contains(out, "primary (protected)")
	}, 30*time.Second, 50*time.Millisecond)
}

// Benchmark-only switches work but stay out of the user's help.
func TestHelpHidesBenchmarkSwitches(t *testing.T) {
	for _, cmd := range []string{"run", "standby"} {
		out, errOut, status := govmm(t, time.Minute, "help", cmd)
		require.Equal(t, 0, status)
		help := out + errOut
		require.Contains(t, help, "-replicate-to")
		require.Contains(t, help, "-failover-timeout")
		for _, hidden := range []string{"unsafe-no-output-buffering", "no-ioeventfd", "null-standby", "null"} {
			require.NotContains(t, help, hidden, "govmm help %s", cmd)
		}
	}
}

// --disk PATH,nodiscard on both ends keeps the standby's copy allocated:
// the primary's sparse image travels as zero runs, which the standby
// zeroes in place rather than punches, so its copy holds every block
// (with discard it would stay as sparse as the primary's).
func TestStandbyKeepsNoDiscardCopyAllocated(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	sparse := func(name string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte("a little data, then a hole"), 0o644))
		require.NoError(t, os.Truncate(p, 4<<20))
		return p
	}
	primary, copyDisk := sparse("primary.img"), sparse("copy.img")
	require.Less(t, allocatedBytes(t, copyDisk), int64(1<<20))
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbSock, pSock := filepath.Join(dir, "sb.sock"), filepath.Join(dir, "p.sock")
	startVM(t, "standby", "--listen", addr, "--net", "none", "--api-sock", sbSock, "--disk", copyDisk+",nodiscard")
	waitStandingBy(t, sbSock)
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--disk", primary+",nodiscard", "--api-sock", pSock, "--replicate-to", addr)
	waitSocket(t, pSock)
	require.Eventually(t, func() bool {
		out, _, _ := govmm(t, time.Minute, "ctl", "--api-sock", pSock, "info")
		return strings.Contains(out, "primary (protected)")
	}, 30*time.Second, 50*time.Millisecond)
	require.Less(t, allocatedBytes(t, primary), int64(1<<20), "the primary's image is not touched")
	require.GreaterOrEqual(t, allocatedBytes(t, copyDisk), int64(4<<20), "the standby's copy holds every block")
	got, err := os.ReadFile(copyDisk)
	require.NoError(t, err)
	want, err := os.ReadFile(primary)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "and equals the primary's")
}
