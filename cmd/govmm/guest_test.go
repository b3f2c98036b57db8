package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/kvmtest"
	"govmm/internal/netns"
)

// guest is a govmm run process booting the default guest.
type guest struct {
	cmd  *exec.Cmd
	done chan error
}

// startGuest starts cmd (a govmm run) and waits for the guest's ready line.
func startGuest(t *testing.T, cmd *exec.Cmd) *guest {
	t.Helper()
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	g := &guest{cmd: cmd, done: make(chan error, 1)}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.TrimRight(sc.Text(), "\r") == guestimg.ReadyLine {
				close(ready)
				break
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		g.done <- cmd.Wait()
	}()
	t.Cleanup(func() { g.kill() })
	select {
	case <-ready:
	case err := <-g.done:
		t.Fatalf("guest exited before ready: %v", err)
	case <-time.After(5 * time.Minute):
		t.Fatal("guest not ready within 5 minutes")
	}
	return g
}

func (g *guest) kill() {
	if g.cmd.Process != nil {
		_ = syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// exercise drives the demo service: healthz, incr twice, append lines,
// log. It returns the log's lines.
func exercise(t *testing.T, c *http.Client, base string, lines ...string) []string {
	t.Helper()
	get := func(path string) string {
		resp, err := c.Get(base + path)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
		return string(b)
	}
	post := func(path, body string) string {
		resp, err := c.Post(base+path, "text/plain", strings.NewReader(body))
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode, path)
		return strings.TrimSpace(string(b))
	}
	require.Eventually(t, func() bool {
		resp, err := c.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, time.Minute, 100*time.Millisecond)
	require.Equal(t, "ok\n", get("/healthz"))
	a := post("/incr", "")
	b := post("/incr", "")
	require.Equal(t, fmt.Sprint(atoi(t, a)+1), b, "the counter goes up by one")
	for _, l := range lines {
		post("/append", l)
	}
	log := strings.TrimSpace(get("/log"))
	if log == "" {
		return nil
	}
	return strings.Split(log, "\n")
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

// The demo service answers through --publish on user-mode networking, and
// lines appended to the disk survive poweroff and a second boot.
func TestGuestDemoUserNetAndDiskPersistence(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	disk := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(disk, nil, 0o644))
	require.NoError(t, os.Truncate(disk, 64<<20))
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	g := startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk))
	lines := exercise(t, http.DefaultClient, base, "first", "second")
	require.Equal(t, []string{"first", "second"}, lines)
	g.kill()
	<-g.done

	// A second boot on the same disk: the file system is mounted, not
	// reformatted, and the lines are still there.
	g = startGuest(t, exec.Command(govmmBin, "run", "--publish", fmt.Sprintf("%d:80", port), "--disk", disk))
	lines = exercise(t, http.DefaultClient, base, "third")
	require.Equal(t, []string{"first", "second", "third"}, lines)
	_ = g
}

// The same through a TAP device on a Linux bridge in a network namespace.
func TestGuestDemoOverTAP(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	ns := netns.New(t)
	require.NoError(t, ns.AddTap("govmmtap0"))
	prefix := ns.BridgePrefix()
	guestIP := prefix.Addr().Next().Next() // bridge is .1
	disk := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(disk, nil, 0o644))
	require.NoError(t, os.Truncate(disk, 64<<20))
	cmd := ns.Command(govmmBin, "run", "--net", "tap:govmmtap0", "--disk", disk,
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
	startGuest(t, exec.Command(govmmBin, "run", "--net", "none", "--disk", disk, "--api-sock", pSock, "--replicate-to", addr))
	t.Logf("guest ready %v after start, replicated from its first instruction", time.Since(start))
	metric := func(name string) float64 {
		out, _, status := govmm(t, time.Minute, "ctl", "--api-sock", pSock, "metrics")
		require.Equal(t, 0, status)
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == name {
				var v float64
				_, err := fmt.Sscan(f[1], &v)
				require.NoError(t, err)
				return v
			}
		}
		t.Fatalf("no metric %s in:\n%s", name, out)
		return 0
	}
	// Some more time of a running guest (its services start, it writes).
	e0 := metric("govmm_replication_acked_epoch")
	time.Sleep(20 * time.Second)
	require.Equal(t, 1.0, metric("govmm_replication_protected"), "the primary still has its standby")
	require.Greater(t, metric("govmm_replication_acked_epoch"), e0, "checkpoints keep being acknowledged")
	_, err := os.Stat(sbSock)
	require.True(t, os.IsNotExist(err), "the standby has not taken over (its API would be up)")
	require.NotContains(t, sbLog.String(), "took over")
	t.Logf("epochs acked %v; backpressured %v (%.1fs in all); standby log:\n%s",
		metric("govmm_replication_acked_epoch"), metric("govmm_replication_backpressure_epochs_total"),
		metric("govmm_replication_backpressure_seconds_total"), sbLog.String())
}
