package netns

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BridgeName is the bridge every namespace holds.
const BridgeName = "br0"

// subnetCounter picks the third octet of each namespace's 10.77.X.0/24, so
// that namespaces of one test binary get distinct subnets; they are isolated
// anyway, distinct subnets only keep logs unambiguous.
var subnetCounter atomic.Uint32

// NS is a network namespace made for one test.
type NS struct {
	name     string
	bridgeIP netip.Prefix
}

// New creates a network namespace with lo up and a bridge br0 holding
// 10.77.X.1/24, and deletes it (and every interface in it) when t ends. It
// skips t if not root or if ip is missing.
func New(t testing.TB) *NS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("netns: needs root to create network namespaces (euid %d)", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("netns: needs iproute2's ip: %v", err)
	}
	var rnd [4]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatalf("netns: random name: %v", err)
	}
	x := byte(subnetCounter.Add(1) + uint32(os.Getpid()))
	ns := &NS{
		name:     "govmm-" + hex.EncodeToString(rnd[:]),
		bridgeIP: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, x, 1}), 24),
	}
	if err := ip("netns", "add", ns.name); err != nil {
		t.Fatalf("netns: %v", err)
	}
	t.Cleanup(func() {
		if err := ip("netns", "del", ns.name); err != nil {
			t.Errorf("netns: %v", err)
		}
	})
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", BridgeName, "type", "bridge"},
		{"addr", "add", ns.bridgeIP.String(), "dev", BridgeName},
		{"link", "set", BridgeName, "up"},
	} {
		if err := ip(append([]string{"-n", ns.name}, args...)...); err != nil {
			t.Fatalf("netns %s: %v", ns.name, err)
		}
	}
	return ns
}

// ip runs iproute2's ip, returning its output in the error.
func ip(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Name returns the namespace's name, as ip netns knows it.
func (n *NS) Name() string { return n.name }

// Path returns the namespace's bind mount, for setns(2).
func (n *NS) Path() string { return "/run/netns/" + n.name }

// BridgeIP returns the bridge's address in the namespace, e.g. 10.77.5.1.
func (n *NS) BridgeIP() netip.Addr { return n.bridgeIP.Addr() }

// BridgePrefix returns the bridge's address with its prefix, e.g.
// 10.77.5.1/24; the rest of the /24 is free for the test's hosts.
func (n *NS) BridgePrefix() netip.Prefix { return n.bridgeIP }

// Command returns a command that runs name inside the namespace (through ip
// netns exec).
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", n.name, name}, args...)...)
}

// AddTap creates a persistent TAP device in the namespace, enslaved to br0
// and up, for a VMM started inside the namespace to open (--net tap:NAME).
// It goes with the namespace.
func (n *NS) AddTap(name string) error {
	if err := ip("-n", n.name, "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"); err != nil {
		return fmt.Errorf("netns %s: add tap: %w", n.name, err)
	}
	return n.Enslave(name)
}

// Enslave puts the interface name on br0 and brings it up.
func (n *NS) Enslave(name string) error {
	if err := ip("-n", n.name, "link", "set", name, "master", BridgeName, "up"); err != nil {
		return fmt.Errorf("netns %s: enslave %s: %w", n.name, name, err)
	}
	return nil
}

// Run calls fn on an OS thread that is inside the namespace. Sockets and TAP
// devices that fn opens belong to the namespace. fn must do its work on the
// calling goroutine: goroutines it starts run outside.
func (n *NS) Run(fn func() error) error {
	type result struct{ err error }
	done := make(chan result, 1)
	go func() {
		// Never unlocked if switching back fails: the goroutine then exits
		// locked, and the runtime ends the thread rather than reuse it in
		// the wrong namespace.
		runtime.LockOSThread()
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- result{fmt.Errorf("netns %s: %w", n.name, err)}
			return
		}
		defer home.Close()
		target, err := os.Open(n.Path())
		if err != nil {
			done <- result{fmt.Errorf("netns %s: %w", n.name, err)}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{fmt.Errorf("netns %s: enter: %w", n.name, err)}
			return
		}
		fnErr := fn()
		if err := unix.Setns(int(home.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- result{fmt.Errorf("netns %s: leave: %w", n.name, err)}
			return
		}
		runtime.UnlockOSThread()
		done <- result{fnErr}
	}()
	return (<-done).err
}

// Dial connects to addr from inside the namespace. addr must be an IP
// address: resolving names is not namespace-aware.
func (n *NS) Dial(network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return n.DialContext(ctx, network, addr)
}

// DialContext is Dial with a context.
func (n *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Run(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Listen listens on addr inside the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Run(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket listens for datagrams on addr inside the namespace.
func (n *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := n.Run(func() error {
		var err error
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

// HTTPClient returns a client whose connections are made inside the
// namespace, with no proxy and no connection reuse between calls to
// HTTPClient.
func (n *NS) HTTPClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			Proxy:       nil,
			DialContext: n.DialContext,
		},
		Timeout: 30 * time.Second,
	}
}
