package netns

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNewAddTapDial(t *testing.T) {
	ns := New(t)

	require.NoError(t, ns.AddTap("tap0"))
	out, err := ns.Command("ip", "-o", "link", "show", "tap0").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), "master "+BridgeName)

	// The namespace has its own interfaces: lo, br0 and tap0, nothing of
	// the host's.
	var names []string
	require.NoError(t, ns.Run(func() error {
		ifs, err := net.Interfaces()
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	}))
	assert.ElementsMatch(t, []string{"lo", BridgeName, "tap0"}, names)

	// A listener on the bridge address inside the namespace answers a dial
	// made inside it.
	l, err := ns.Listen("tcp", net.JoinHostPort(ns.BridgeIP().String(), "0"))
	require.NoError(t, err)
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		fmt.Fprintf(c, "got %s", b)
	}()
	c, err := ns.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "got ping", string(b))
}

func TestHTTPClient(t *testing.T) {
	ns := New(t)
	l, err := ns.Listen("tcp", net.JoinHostPort(ns.BridgeIP().String(), "0"))
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})}
	go srv.Serve(l)
	defer srv.Close()

	client := ns.HTTPClient()
	resp, err := client.Get("http://" + l.Addr().String() + "/healthz")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, "ok", string(b))
}

func TestCommandRunsInside(t *testing.T) {
	ns := New(t)
	out, err := ns.Command("ip", "-4", "-o", "addr", "show", "dev", BridgeName).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Contains(t, string(out), ns.BridgePrefix().String())
}

func TestCleanupRemovesNamespace(t *testing.T) {
	var path string
	t.Run("inner", func(t *testing.T) {
		ns := New(t)
		path = ns.Path()
		_, err := os.Stat(path)
		require.NoError(t, err)
	})
	if path == "" {
		t.Skip("inner test skipped")
	}
	_, err := os.Stat(path)
	assert.True(t, os.IsNotExist(err), "namespace %s still exists: %v", path, err)
}

func TestRunReturnsToHostNamespace(t *testing.T) {
	ns := New(t)
	host, err := os.Readlink("/proc/self/ns/net")
	require.NoError(t, err)
	var inside string
	require.NoError(t, ns.Run(func() error {
		var err error
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}))
	assert.NotEqual(t, host, inside)
	// Many runs, then every thread of the process is still in the host
	// namespace.
	for range 20 {
		require.NoError(t, ns.Run(func() error { return nil }))
	}
	tasks, err := os.ReadDir("/proc/self/task")
	require.NoError(t, err)
	for _, task := range tasks {
		got, err := os.Readlink("/proc/self/task/" + task.Name() + "/ns/net")
		if err != nil {
			continue // thread exited
		}
		assert.True(t, strings.EqualFold(host, got), "thread %s in %s", task.Name(), got)
	}
}
