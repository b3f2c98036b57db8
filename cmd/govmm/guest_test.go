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
