package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/netns"
	"govmm/internal/tinyguest"
	"govmm/vmm"
	"govmm/vmm/container"
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

// startVMLogged is startVM with govmm's stderr kept for the test to read.
func startVMLogged(t *testing.T, args ...string) (*exec.Cmd, *logBuffer) {
	t.Helper()
	log := &logBuffer{}
	cmd := exec.Command(govmmBin, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("govmm %v stderr:\n%s", args, log.String())
		}
	})
	return cmd, log
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

// snapshotCounterAt snapshots the VM at the API socket sock into path
// and returns the counter in that snapshot (snapshotCounter).
func snapshotCounterAt(t require.TestingT, sock, path string) uint64 {
	helper(t)
	_, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sock, "snapshot", "--out", path)
	require.Equal(t, 0, status, errOut)
	return snapshotCounter(t, path)
}

// snapshotCounter reads the tiny guest's counter out of a snapshot file.
func snapshotCounter(t require.TestingT, path string) uint64 {
	helper(t)
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
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, sock1, snap1b), c1)
	}, 30*time.Second, 20*time.Millisecond, "the first VM runs on")

	sock2 := filepath.Join(dir, "vm2.sock")
	startVM(t, "restore", "--net", "none", "--api-sock", sock2, snap1)
	waitSocket(t, sock2)
	snap2 := filepath.Join(dir, "two.snap")
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, sock2, snap2), c1)
	}, 30*time.Second, 20*time.Millisecond, "the restored guest goes on from the snapshot")

	// Damaged and mismatched snapshots: one clear line, non-zero exit.
	good, err := os.ReadFile(snap1)
	require.NoError(t, err)
	bad := filepath.Join(dir, "bad.snap")
	require.NoError(t, os.WriteFile(bad, good[:len(good)-64], 0o644))
	_, errOut, status := govmm(t, time.Minute, "restore", "--net", "none", bad)
	require.Equal(t, 1, status)
	require.Contains(t, errOut, "bad snapshot file")
	_, errOut, status = govmm(t, time.Minute, "restore", snap1, "--disk", kernel)
	require.Equal(t, 1, status)
	require.Equal(t, "govmm: snapshot "+snap1+": 1 --disk given, but the VM had 0 disks, and a restored guest keeps its devices", firstLine(errOut))
}

// requireListening fails unless something accepts TCP connections at addr.
func requireListening(t *testing.T, addr string) {
	t.Helper()
	require.Eventually(t, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "nothing listens at %s", addr)
}

// A snapshot carries its VM's devices: restore with no flags (or flags
// after the file) rebuilds the same network with its published ports,
// disk and MAC, and the restored VM's own snapshot records the same;
// flags override the host-specific parts (the published ports); another
// kind of network is refused in one line; a snapshot older than the
// config (format 2) restores with explicit flags, or says what it
// assumes.
func TestRestoreDevicesFromSnapshot(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	disk := filepath.Join(dir, "disk.img")
	require.NoError(t, os.WriteFile(disk, make([]byte, 1<<20), 0o644))
	ctl := func(sock string, args ...string) string {
		t.Helper()
		out, errOut, status := govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
		require.Equal(t, 0, status, "ctl %v: %s", args, errOut)
		return out
	}

	port1 := itoa(freePort(t))
	sock1 := filepath.Join(dir, "vm1.sock")
	vm1 := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "user",
		"--publish", "127.0.0.1:"+port1+":80", "--disk", disk+",ro", "--mac", "52:54:00:12:34:56",
		"--guest-ip", "10.0.2.20/24", "--name", "vm1", "--api-sock", sock1)
	waitSocket(t, sock1)
	requireListening(t, "127.0.0.1:"+port1)
	snap := filepath.Join(dir, "vm1.snap")
	ctl(sock1, "snapshot", "--out", snap)
	h, err := vmm.ReadSnapshotHeader(snap)
	require.NoError(t, err)
	require.Equal(t, uint16(3), h.Version)
	want := vmm.SnapshotConfig{{Name: "name", Value: "vm1"}, {Name: "net", Value: "user"}, {Name: "mac", Value: "52:54:00:12:34:56"},
		{Name: "publish", Value: "127.0.0.1:" + port1 + ":80"}, {Name: "disk", Value: disk + ",ro"}, {Name: "guest-ip", Value: "10.0.2.20/24"}}
	require.Equal(t, want, h.Config)
	require.NoError(t, vm1.Process.Signal(syscall.SIGTERM))
	_ = vm1.Wait()

	// No device flags, and a flag after the file: the same devices, the
	// same published port.
	sock2 := filepath.Join(dir, "vm2.sock")
	startVM(t, "restore", snap, "--api-sock", sock2)
	waitGuestHere(t, sock2)
	requireListening(t, "127.0.0.1:"+port1)
	snap2 := filepath.Join(dir, "vm2.snap")
	ctl(sock2, "snapshot", "--out", snap2)
	h2, err := vmm.ReadSnapshotHeader(snap2)
	require.NoError(t, err)
	require.Equal(t, want, h2.Config)

	// Another host port while the first restore holds the snapshot's.
	port3 := itoa(freePort(t))
	sock3 := filepath.Join(dir, "vm3.sock")
	startVM(t, "restore", "--api-sock", sock3, snap, "--publish", "127.0.0.1:"+port3+":80")
	waitGuestHere(t, sock3)
	requireListening(t, "127.0.0.1:"+port3)

	// Refusals, in one line.
	_, errOut, status := govmm(t, time.Minute, "restore", snap, "--net", "none")
	require.Equal(t, 1, status)
	require.Equal(t, "govmm: snapshot "+snap+": --net none: the VM had --net user, and a restored guest keeps its devices (leave --net out, or name another TAP with tap:NAME)", firstLine(errOut))
	_, errOut, status = govmm(t, time.Minute, "restore", snap, "extra")
	require.Equal(t, usageStatus, status)
	require.Equal(t, "govmm: restore: want one snapshot file, got 2 arguments (see 'govmm help restore')", firstLine(errOut))

	// A format 2 snapshot of a --net none VM: restored with its flags
	// given (after the file); without them, the notice says what restore
	// assumes, and the devices do not match.
	sock4 := filepath.Join(dir, "vm4.sock")
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock4)
	waitSocket(t, sock4)
	snap4 := filepath.Join(dir, "vm4.snap")
	ctl(sock4, "snapshot", "--out", snap4)
	// As format 3 it needs no flag: it restores as --net none.
	sock6 := filepath.Join(dir, "vm6.sock")
	startVM(t, "restore", snap4, "--api-sock", sock6)
	waitGuestHere(t, sock6)
	old := filepath.Join(dir, "old.snap")
	writeSnapshotV2(t, snap4, old)
	h, err = vmm.ReadSnapshotHeader(old)
	require.NoError(t, err)
	require.Equal(t, uint16(2), h.Version)
	sock5 := filepath.Join(dir, "vm5.sock")
	startVM(t, "restore", old, "--net", "none", "--api-sock", sock5)
	waitGuestHere(t, sock5)
	_, errOut, status = govmm(t, time.Minute, "restore", old)
	require.Equal(t, 1, status)
	require.Equal(t, "govmm: notice: snapshot "+old+" (format 2) does not record its devices: restoring with --net user, no disk and the default MAC; give the VM's --net, --disk and --mac if they differed", firstLine(errOut))
	require.Contains(t, errOut, "does not match")
}

// writeSnapshotV2 rewrites the format 3 snapshot src as format 2 (no
// config section) at dst, as a govmm before the config wrote it.
func writeSnapshotV2(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	require.NoError(t, err)
	defer in.Close()
	r, err := container.NewReader(bufio.NewReader(in), container.Format{Magic: container.MagicSnapshot, MinVersion: 3, MaxVersion: 3,
		Caps: map[container.Type]int{container.TypeState: vmm.MaxStateSize, container.TypeConfig: 1 << 20, container.TypePages: container.MaxPagesPayload}})
	require.NoError(t, err)
	out, err := os.Create(dst)
	require.NoError(t, err)
	defer out.Close()
	bw := bufio.NewWriter(out)
	w, err := container.NewWriter(bw, container.MagicSnapshot, 2)
	require.NoError(t, err)
	for {
		s, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		if s.Type != container.TypeConfig {
			require.NoError(t, w.Section(s.Type, s.Payload))
		}
	}
	require.NoError(t, w.Close())
	require.NoError(t, bw.Flush())
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

// A snapshot of a VM on a TAP restores onto another TAP of this host
// (--net tap:NAME overrides the host-specific part), and the restored
// VM's own snapshot records the TAP it now uses; without the flag the
// snapshot's TAP is opened again.
func TestRestoreOntoAnotherTAP(t *testing.T) {
	kvmtest.Require(t)
	ns := netns.New(t)
	require.NoError(t, ns.AddTap("gra"))
	require.NoError(t, ns.AddTap("grb"))
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	ctl := func(sock string, args ...string) {
		t.Helper()
		_, errOut, status := govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
		require.Equal(t, 0, status, "ctl %v: %s", args, errOut)
	}
	start := func(args ...string) *exec.Cmd {
		t.Helper()
		cmd := ns.Command(govmmBin, args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() })
		return cmd
	}
	config := func(snap string) vmm.SnapshotConfig {
		t.Helper()
		h, err := vmm.ReadSnapshotHeader(snap)
		require.NoError(t, err)
		return h.Config
	}
	netOf := func(cfg vmm.SnapshotConfig) string {
		for _, s := range cfg {
			if s.Name == "net" {
				return s.Value
			}
		}
		return ""
	}

	sock1 := filepath.Join(dir, "1.sock")
	vm1 := start("run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "tap:gra",
		"--guest-ip", "10.77.0.2/24", "--api-sock", sock1)
	waitSocket(t, sock1)
	snap := filepath.Join(dir, "1.snap")
	ctl(sock1, "snapshot", "--out", snap)
	require.Equal(t, "tap:gra", netOf(config(snap)))
	require.NoError(t, syscall.Kill(-vm1.Process.Pid, syscall.SIGKILL))
	_ = vm1.Wait()

	sock2 := filepath.Join(dir, "2.sock")
	start("restore", snap, "--net", "tap:grb", "--api-sock", sock2)
	waitGuestHere(t, sock2)
	snap2 := filepath.Join(dir, "2.snap")
	ctl(sock2, "snapshot", "--out", snap2)
	want := config(snap)
	for i := range want {
		if want[i].Name == "net" {
			want[i].Value = "tap:grb"
		}
	}
	require.Equal(t, want, config(snap2), "the same devices, on the other TAP")

	sock3 := filepath.Join(dir, "3.sock")
	start("restore", snap, "--api-sock", sock3)
	waitGuestHere(t, sock3)
}
