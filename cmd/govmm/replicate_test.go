package main

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

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
	sbLog := &strings.Builder{}
	sb := exec.Command(govmmBin, "standby", "--listen", addr, "--net", "none", "--api-sock", sbSock, "--failover-timeout", "1s")
	sb.Stderr = sbLog
	sb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, sb.Start())
	t.Cleanup(func() { _ = syscall.Kill(-sb.Process.Pid, syscall.SIGKILL); _ = sb.Wait() })
	time.Sleep(200 * time.Millisecond)

	pSock := filepath.Join(dir, "primary.sock")
	prim := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", pSock, "--replicate-to", addr, "--epoch", "20ms", "--failover-timeout", "1s")
	waitSocket(t, pSock)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(pSock, "info")
		return strings.Contains(out, "protected")
	}, 30*time.Second, 50*time.Millisecond)
	metrics, _, status := ctl(pSock, "metrics")
	require.Equal(t, 0, status)
	require.Contains(t, metrics, "govmm_replication_protected 1")

	before := filepath.Join(dir, "before.snap")
	_, errOut, status := ctl(pSock, "snapshot", "--out", before)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, before)
	time.Sleep(300 * time.Millisecond) // more checkpoints commit after the snapshot

	killed := time.Now()
	require.NoError(t, syscall.Kill(-prim.Process.Pid, syscall.SIGKILL))
	waitSocket(t, sbSock)
	t.Logf("standby answering %v after SIGKILL", time.Since(killed))
	after := filepath.Join(dir, "after.snap")
	_, errOut, status = ctl(sbSock, "snapshot", "--out", after)
	require.Equal(t, 0, status, errOut)
	require.Greater(t, snapshotCounter(t, after), c0, "the guest carries on at the standby from a checkpoint after the snapshot")
	require.Contains(t, sbLog.String(), "took over at checkpoint")
}

// Re-protection: the standby that took over replicates the guest to a
// new standby at once; when it dies in turn, the third host carries on.
func TestReprotectAndFailOverAgain(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	addrB := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	addrC := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sockA, sockB, sockC := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock"), filepath.Join(dir, "c.sock")

	startVM(t, "standby", "--listen", addrC, "--net", "none", "--api-sock", sockC)
	b := startVM(t, "standby", "--listen", addrB, "--net", "none", "--api-sock", sockB, "--replicate-to", addrC, "--epoch", "20ms")
	time.Sleep(200 * time.Millisecond)
	a := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", sockA, "--replicate-to", addrB, "--epoch", "20ms")
	waitSocket(t, sockA)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sockA, "info")
		return strings.Contains(out, "protected")
	}, 30*time.Second, 50*time.Millisecond)
	snap := filepath.Join(dir, "a.snap")
	_, errOut, status := ctl(sockA, "snapshot", "--out", snap)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, snap)
	time.Sleep(200 * time.Millisecond)

	require.NoError(t, syscall.Kill(-a.Process.Pid, syscall.SIGKILL))
	waitSocket(t, sockB)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sockB, "info")
		return strings.Contains(out, "primary (protected)")
	}, 30*time.Second, 50*time.Millisecond, "B protects the guest with C")
	snapB := filepath.Join(dir, "b.snap")
	_, errOut, status = ctl(sockB, "snapshot", "--out", snapB)
	require.Equal(t, 0, status, errOut)
	c1 := snapshotCounter(t, snapB)
	require.Greater(t, c1, c0)
	time.Sleep(200 * time.Millisecond)

	require.NoError(t, syscall.Kill(-b.Process.Pid, syscall.SIGKILL))
	waitSocket(t, sockC)
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
	sb1 := startVM(t, "standby", "--listen", addr1, "--net", "none")
	time.Sleep(200 * time.Millisecond)
	out, errOut, status := ctl(sock, "replicate", "--to", addr1)
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "protected by")
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
	time.Sleep(50 * time.Millisecond)
	_, errOut, status = ctl(sock, "snapshot", "--out", s2)
	require.Equal(t, 0, status, errOut)
	require.Greater(t, snapshotCounter(t, s2), snapshotCounter(t, s1), "the guest keeps running")

	// Protected again by a new standby, then replication stopped: that
	// standby discards its replica and exits without running the guest.
	addr2 := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sb2 := exec.Command(govmmBin, "standby", "--listen", addr2, "--net", "none")
	var sb2Err strings.Builder
	sb2.Stderr = &sb2Err
	require.NoError(t, sb2.Start())
	t.Cleanup(func() { _ = sb2.Process.Kill(); _ = sb2.Wait() })
	time.Sleep(200 * time.Millisecond)
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

// A live migration of a VM that is being replicated is refused (the
// migration's dirty tracker would take the bits the replication needs,
// and the standby's copy would silently diverge); replication goes on.
func TestCtlMigrateWhileReplicatingRefused(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	standby := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbLog := &syncBuilder{}
	sb := exec.Command(govmmBin, "standby", "--listen", standby, "--net", "none", "--failover-timeout", "2s")
	sb.Stderr = sbLog
	require.NoError(t, sb.Start())
	t.Cleanup(func() { _ = sb.Process.Kill(); _ = sb.Wait() })
	dest := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	destLog := &syncBuilder{}
	d := exec.Command(govmmBin, "standby", "--listen", dest, "--net", "none")
	d.Stderr = destLog
	require.NoError(t, d.Start())
	t.Cleanup(func() { _ = d.Process.Kill(); _ = d.Wait() })
	sock := filepath.Join(dir, "p.sock")
	// Their stderr says when they listen (a probing connection would end a
	// waiting standby: issue 10).
	for _, l := range []*syncBuilder{sbLog, destLog} {
		require.Eventually(t, func() bool { return strings.Contains(l.String(), "listening on") }, 30*time.Second, 10*time.Millisecond)
	}
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock,
		"--replicate-to", standby, "--epoch", "20ms", "--failover-timeout", "2s")
	waitSocket(t, sock)
	require.Eventually(t, func() bool {
		out, _, _ := ctl(sock, "metrics")
		return strings.Contains(out, "govmm_replication_protected 1")
	}, 30*time.Second, 50*time.Millisecond)

	_, errOut, status := ctl(sock, "migrate", "--to", dest)
	require.NotEqual(t, 0, status)
	require.Contains(t, errOut, "dirty tracking already in use")
	out, _, _ := ctl(sock, "metrics")
	require.Contains(t, out, "govmm_replication_protected 1", "replication goes on")
	werr := make(chan error, 1)
	go func() { werr <- d.Wait() }()
	select {
	case err := <-werr:
		require.Error(t, err, "the destination never runs the guest")
	case <-time.After(30 * time.Second):
		t.Fatal("the migration destination still waits")
	}
	require.NotContains(t, destLog.String(), "migration received")
	require.NotContains(t, destLog.String(), "took over")
}

// syncBuilder is a strings.Builder safe for a process's output goroutine.
type syncBuilder struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuilder) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuilder) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
