package main

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

const counterGPA = 0x8000

// startVM starts govmm with args in the background and kills it at the
// end of the test.
func startVM(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(govmmBin, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	return cmd
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	require.Eventually(t, func() bool {
		_, err := os.Stat(path)
		return err == nil
	}, 30*time.Second, 10*time.Millisecond, "no API socket at %s", path)
}

// waitGuestHere waits until the VMM at the API socket path runs the guest
// (a standby serves its socket while standing by, too).
func waitGuestHere(t *testing.T, path string) {
	t.Helper()
	waitSocket(t, path)
	require.Eventually(t, func() bool {
		out, _, status := govmm(t, time.Minute, "ctl", "--api-sock", path, "info", "--json")
		return status == 0 && !strings.Contains(out, `"standing by"`)
	}, 60*time.Second, 20*time.Millisecond, "the guest does not run at %s", path)
}

// tinyGuestFiles writes a tiny guest's bzImage and a placeholder initrd.
func tinyGuestFiles(t *testing.T, dir string, code []byte) (kernel, initrd string) {
	t.Helper()
	kernel, initrd = filepath.Join(dir, "guest.bzImage"), filepath.Join(dir, "initrd")
	require.NoError(t, os.WriteFile(kernel, tinyguest.Kernel(code), 0o644))
	require.NoError(t, os.WriteFile(initrd, []byte("x"), 0o644))
	return kernel, initrd
}

// snapshotCounter reads the tiny guest's counter out of a snapshot file.
func snapshotCounter(t *testing.T, path string) uint64 {
	t.Helper()
	st, err := vmm.ReadSnapshotState(path)
	require.NoError(t, err)
	var specs []guestmem.Spec
	for _, r := range vmm.RAMLayout(st.Memory.MemSize) {
		specs = append(specs, guestmem.Spec{GPA: guestmem.GPA(r.GPA), Size: r.Size})
	}
	mem, err := guestmem.New(specs)
	require.NoError(t, err)
	defer mem.Close()
	_, err = vmm.ReadSnapshot(path, mem)
	require.NoError(t, err)
	b, err := mem.Slice(counterGPA, 8)
	require.NoError(t, err)
	return binary.LittleEndian.Uint64(b)
}

// The control API pauses, resumes and snapshots a running VM; govmm
// restore resumes the snapshot and the guest's counter goes on from where
// it was, never back; a damaged snapshot is refused.
func TestCtlSnapshotAndRestore(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	sock1 := filepath.Join(dir, "vm1.sock")
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock1)
	waitSocket(t, sock1)

	ctl := func(sock string, args ...string) string {
		t.Helper()
		out, errOut, status := govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
		require.Equal(t, 0, status, "ctl %v: %s", args, errOut)
		return out
	}
	require.Contains(t, ctl(sock1, "info"), "running")
	ctl(sock1, "pause")
	require.Contains(t, ctl(sock1, "info"), "paused")
	ctl(sock1, "resume")
	require.Contains(t, ctl(sock1, "metrics"), "govmm_vcpu_exits_total")

	snap1 := filepath.Join(dir, "one.snap")
	ctl(sock1, "snapshot", "--out", snap1)
	c1 := snapshotCounter(t, snap1)
	require.Greater(t, c1, uint64(0))

	// The first VM keeps running after the snapshot: its counter grows.
	snap1b := filepath.Join(dir, "oneb.snap")
	require.Eventually(t, func() bool {
		ctl(sock1, "snapshot", "--out", snap1b)
		return snapshotCounter(t, snap1b) > c1
	}, 30*time.Second, 20*time.Millisecond, "the first VM runs on")

	sock2 := filepath.Join(dir, "vm2.sock")
	startVM(t, "restore", "--net", "none", "--api-sock", sock2, snap1)
	waitSocket(t, sock2)
	snap2 := filepath.Join(dir, "two.snap")
	require.Eventually(t, func() bool {
		ctl(sock2, "snapshot", "--out", snap2)
		return snapshotCounter(t, snap2) > c1
	}, 30*time.Second, 20*time.Millisecond, "the restored guest goes on from the snapshot")

	// Damaged and mismatched snapshots: one clear line, non-zero exit.
	good, err := os.ReadFile(snap1)
	require.NoError(t, err)
	bad := filepath.Join(dir, "bad.snap")
	require.NoError(t, os.WriteFile(bad, good[:len(good)-64], 0o644))
	_, errOut, status := govmm(t, time.Minute, "restore", "--net", "none", bad)
	require.Equal(t, 1, status)
	require.Contains(t, errOut, "bad snapshot file")
	_, errOut, status = govmm(t, time.Minute, "restore", "--net", "none", "--disk", kernel, snap1)
	require.Equal(t, 1, status)
	require.Contains(t, errOut, "does not match")
}

// waitStandingBy waits until the standby at the API socket path answers
// while standing by: it listens for a source from then on (it serves its
// API only once its listener is up).
func waitStandingBy(t *testing.T, path string) {
	t.Helper()
	waitSocket(t, path)
	require.Eventually(t, func() bool {
		out, _, status := govmm(t, time.Minute, "ctl", "--api-sock", path, "info", "--json")
		return status == 0 && strings.Contains(out, `"standing by"`)
	}, 30*time.Second, 20*time.Millisecond, "no standby standing by at %s", path)
}

// waitAckedPast waits until the primary at the API socket path has a
// checkpoint acknowledged that was taken after this call.
func waitAckedPast(t *testing.T, path string) {
	t.Helper()
	metric := func(name string) float64 {
		out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", path, "metrics")
		require.Equal(t, 0, status, errOut)
		return metricValue(t, out, name)
	}
	taken := metric("govmm_replication_epoch")
	require.Eventually(t, func() bool { return metric("govmm_replication_acked_epoch") > taken },
		30*time.Second, 20*time.Millisecond, "no checkpoint after epoch %v acknowledged", taken)
}
