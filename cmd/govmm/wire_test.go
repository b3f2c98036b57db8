package main

// What reaches the wire, for the fencing tests: a capture of the frames
// each VMM writes into its TAP (kernel timestamps, so that frames of
// different TAPs are ordered truly), and a TCP proxy inside a test's
// network namespace that a test can cut, as a partition would.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/internal/netns"
	"govmm/virtio/netback"
)

// tapCapture records when each frame that a VMM writes into one of the
// TAPs it watches reaches the kernel (the frames that go to the bridge);
// frames the bridge sends to the VMM are not counted.
type tapCapture struct {
	mu     sync.Mutex
	frames map[string][]time.Time // by TAP, in kernel receive order
	fds    []int
	// delivered counts the frames the kernel queued to the packet
	// sockets, dropped those it could not (PACKET_STATISTICS, which
	// resets on each read, summed); handled those the readers took off
	// the queues, whichever way they went.
	delivered, dropped uint64
	handled            atomic.Uint64
	wg                 sync.WaitGroup
	closed             atomic.Bool
}

func newTapCapture(t *testing.T) *tapCapture {
	c := &tapCapture{frames: map[string][]time.Time{}}
	t.Cleanup(c.close)
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// watch starts capturing on the TAP name in ns.
func (c *tapCapture) watch(ns *netns.NS, name string) error {
	var fd int
	err := ns.Run(func() error {
		ifi, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
			unix.Close(fd)
			return err
		}
		// A large buffer: the lab is slow to read, and a lost frame would
		// be a lost witness.
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20)
		// Closing a packet socket does not wake a reader blocked in
		// recvmsg (nor does shutdown, which AF_PACKET lacks): the reader
		// wakes up now and then to see whether the capture was closed.
		tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("bind to %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("capture on %s: %w", name, err)
	}
	c.mu.Lock()
	c.fds = append(c.fds, fd)
	if c.frames[name] == nil {
		c.frames[name] = []time.Time{}
	}
	c.mu.Unlock()
	c.wg.Add(1)
	go c.read(fd, name)
	return nil
}

func (c *tapCapture) read(fd int, name string) {
	defer c.wg.Done()
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	for {
		_, oobn, _, from, err := unix.Recvmsg(fd, buf, oob, 0)
		if err != nil {
			if c.closed.Load() || errors.Is(err, unix.EBADF) {
				return
			}
			if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
				continue
			}
			return
		}
		if c.closed.Load() {
			return
		}
		c.take(from, oob[:oobn], name)
		c.handled.Add(1)
	}
}

// take records a frame that the VMM wrote into tap, and leaves out one
// towards the VMM.
func (c *tapCapture) take(from unix.Sockaddr, oob []byte, name string) {
	if ll, ok := from.(*unix.SockaddrLinklayer); !ok || ll.Pkttype == unix.PACKET_OUTGOING {
		return // towards the VMM, not from it
	}
	at := time.Now()
	if msgs, err := unix.ParseSocketControlMessage(oob); err == nil {
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SO_TIMESTAMPNS && len(m.Data) >= 16 {
				sec := int64(binary.LittleEndian.Uint64(m.Data))
				nsec := int64(binary.LittleEndian.Uint64(m.Data[8:]))
				at = time.Unix(sec, nsec)
			}
		}
	}
	c.mu.Lock()
	c.frames[name] = append(c.frames[name], at)
	c.mu.Unlock()
}

// queued is what the kernel has queued to the capture so far: frames
// delivered to its sockets and frames dropped (a full queue).
func (c *tapCapture) queued() (delivered, dropped uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, fd := range c.fds {
		if st, err := unix.GetsockoptTpacketStats(fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
			c.delivered += uint64(st.Packets) // drops included
			c.dropped += uint64(st.Drops)
		}
	}
	return c.delivered, c.dropped
}

// caughtUp reports whether the readers have taken every frame the kernel
// queued to the capture until now.
func (c *tapCapture) caughtUp() bool {
	delivered, dropped := c.queued()
	return c.handled.Load()+dropped >= delivered
}

func (c *tapCapture) close() {
	if c.closed.Swap(true) {
		return
	}
	// The readers stop within their receive timeout; only then are the
	// descriptors closed (closing under a reader could hand its number to
	// another file).
	c.wg.Wait()
	c.mu.Lock()
	for _, fd := range c.fds {
		unix.Close(fd)
	}
	c.mu.Unlock()
}

// count is the number of frames seen from the VMM on tap, and since is
// the number after t.
func (c *tapCapture) count(tap string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.frames[tap])
}

func (c *tapCapture) since(tap string, t time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, at := range c.frames[tap] {
		if at.After(t) {
			n++
		}
	}
	return n
}

// span is when the first and the last frame from tap reached the kernel.
func (c *tapCapture) span(tap string) (first, last time.Time, n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f := c.frames[tap]
	if len(f) == 0 {
		return time.Time{}, time.Time{}, 0
	}
	return slices.MinFunc(f, time.Time.Compare), slices.MaxFunc(f, time.Time.Compare), len(f)
}

// twoEmitters checks that the TAPs' emitting periods never overlap: each
// VMM emits from when it starts running the guest until it dies or is
// fenced, so two VMMs' periods overlapping is a moment with two emitters.
// It returns a description of each overlap (none: exactly one emitter at
// any moment).
func (c *tapCapture) twoEmitters() []string {
	c.mu.Lock()
	type period struct {
		tap         string
		first, last time.Time
		n           int
	}
	var ps []period
	for tap, f := range c.frames {
		if len(f) == 0 {
			continue
		}
		ps = append(ps, period{tap, slices.MinFunc(f, time.Time.Compare), slices.MaxFunc(f, time.Time.Compare), len(f)})
	}
	all := map[string][]time.Time{}
	for tap, f := range c.frames {
		all[tap] = append([]time.Time(nil), f...)
	}
	c.mu.Unlock()
	var out []string
	for i := range ps {
		for j := range ps {
			a, b := ps[i], ps[j]
			if i >= j || a.last.Before(b.first) || b.last.Before(a.first) {
				continue
			}
			// Overlapping: count b's frames inside a's period and the other way.
			inA, inB := 0, 0
			for _, t := range all[b.tap] {
				if !t.Before(a.first) && !t.After(a.last) {
					inA++
				}
			}
			for _, t := range all[a.tap] {
				if !t.Before(b.first) && !t.After(b.last) {
					inB++
				}
			}
			out = append(out, fmt.Sprintf("%s emitted %d frames %s..%s and %s %d frames %s..%s: %d of %s's inside %s's period, %d of %s's inside %s's",
				a.tap, a.n, a.first.Format("15:04:05.000000"), a.last.Format("15:04:05.000000"),
				b.tap, b.n, b.first.Format("15:04:05.000000"), b.last.Format("15:04:05.000000"), inA, b.tap, a.tap, inB, a.tap, b.tap))
		}
	}
	return out
}

// nsProxy is a TCP proxy listening in a namespace (on 127.0.0.1) that
// forwards to target there. Cut, it stops moving bytes in both directions
// (it stops reading, so the senders' TCP windows fill and their writes
// block, as in a partition: silence, no reset) and connections made
// meanwhile carry nothing; healed, it moves the held bytes on.
type nsProxy struct {
	ln     net.Listener
	ns     *netns.NS
	target string
	mu     sync.Mutex // guards conns, cut and healed
	conns  []net.Conn
	cut    bool
	healed chan struct{} // closed while the link is whole
	closed atomic.Bool
	dead   chan struct{} // closed by close
}

func newNSProxy(t *testing.T, ns *netns.NS, target string) *nsProxy {
	t.Helper()
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxy: %v", err)
	}
	p := &nsProxy{ln: ln, ns: ns, target: target, healed: make(chan struct{}), dead: make(chan struct{})}
	close(p.healed)
	go p.serve()
	t.Cleanup(p.close)
	return p
}

func (p *nsProxy) addr() string { return p.ln.Addr().String() }

func (p *nsProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			p.waitHealed()
			u, err := p.ns.Dial("tcp", p.target)
			if err != nil || p.closed.Load() {
				c.Close()
				return
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			go p.pipe(c, u)
			go p.pipe(u, c)
		}()
	}
}

// waitHealed returns once the link is whole, or the proxy closed.
func (p *nsProxy) waitHealed() {
	p.mu.Lock()
	healed := p.healed
	p.mu.Unlock()
	select {
	case <-healed:
	case <-p.dead:
	}
}

func (p *nsProxy) pipe(from, to net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		p.waitHealed()
		n, err := from.Read(buf)
		p.waitHealed()
		if n > 0 {
			if _, werr := to.Write(buf[:n]); werr != nil {
				from.Close()
				return
			}
		}
		if err != nil {
			to.Close()
			return
		}
	}
}

// setCut cuts (true) or heals the link.
func (p *nsProxy) setCut(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && !p.cut:
		p.healed = make(chan struct{})
	case !on && p.cut:
		close(p.healed)
	}
	p.cut = on
}

func (p *nsProxy) close() {
	if p.closed.Swap(true) {
		return
	}
	close(p.dead)
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
}

// The wire helpers themselves: the capture counts exactly the frames a
// VMM writes into its TAP (not those the bridge sends to it), with times
// in order; the proxy carries bytes, holds them while cut, and delivers
// them once healed.
func TestWireHelpers(t *testing.T) {
	ns := netns.New(t)
	require.NoError(t, ns.AddTap("tw0"))
	require.NoError(t, ns.AddTap("tw1"))
	c := newTapCapture(t)
	require.NoError(t, c.watch(ns, "tw0"))
	require.NoError(t, c.watch(ns, "tw1"))
	var taps [2]*netback.TAP
	require.NoError(t, ns.Run(func() error {
		for i, name := range []string{"tw0", "tw1"} {
			tp, err := netback.OpenTAP(name)
			if err != nil {
				return err
			}
			taps[i] = tp
		}
		return nil
	}))
	for _, tp := range taps {
		t.Cleanup(func() { tp.Close() })
	}
	frame := func(i int) []byte {
		f := make([]byte, netback.VnetHdrLen+60)
		eth := f[netback.VnetHdrLen:]
		copy(eth, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0, 0, 9, 0x88, 0xb5}) // local experimental ethertype
		eth[14] = byte(i)
		return f
	}
	for i := range 20 {
		require.NoError(t, taps[0].Send(frame(i)))
	}
	mid := time.Now()
	for i := range 5 {
		require.NoError(t, taps[1].Send(frame(i)))
	}
	require.Eventually(t, func() bool { return c.count("tw0") == 20 && c.count("tw1") == 5 }, 10*time.Second, time.Millisecond)
	_, last0, _ := c.span("tw0")
	first1, _, _ := c.span("tw1")
	require.True(t, last0.Before(first1), "kernel timestamps order the two TAPs' frames")
	require.Equal(t, 0, c.since("tw0", mid))
	require.Empty(t, c.twoEmitters())
	require.NoError(t, taps[0].Send(frame(99))) // tw0 emits again inside tw1's period
	require.Eventually(t, func() bool { return c.count("tw0") == 21 }, 10*time.Second, time.Millisecond)
	require.NoError(t, taps[1].Send(frame(100)))
	require.Eventually(t, func() bool { return len(c.twoEmitters()) == 1 }, 10*time.Second, time.Millisecond)

	// Broadcasts from the bridge reach both TAPs, towards the VMMs: not counted.
	u, err := ns.ListenPacket("udp4", net.JoinHostPort(ns.BridgeIP().String(), "0"))
	require.NoError(t, err)
	defer u.Close()
	require.NoError(t, ns.Run(func() error {
		return unix.SetsockoptInt(int(must(u.(*net.UDPConn).File()).Fd()), unix.SOL_SOCKET, unix.SO_BROADCAST, 1)
	}))
	bcast := ns.BridgePrefix().Masked().Addr().As4()
	bcast[3] = 255
	require.Eventually(t, c.caughtUp, 10*time.Second, time.Millisecond)
	before, _ := c.queued()
	_, err = u.WriteTo([]byte("to the VMMs"), &net.UDPAddr{IP: net.IP(bcast[:]), Port: 9})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		n, _ := c.queued()
		return n >= before+2 && c.caughtUp()
	}, 10*time.Second, time.Millisecond, "the broadcast passes both TAPs' captures")
	require.Equal(t, 21, c.count("tw0"), "and is not counted")
	require.Equal(t, 6, c.count("tw1"))
	_, dropped := c.queued()
	require.Zero(t, dropped, "the capture loses no frame")

	// The proxy.
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			s, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(s, s) }()
		}
	}()
	p := newNSProxy(t, ns, ln.Addr().String())
	conn, err := ns.Dial("tcp", p.addr())
	require.NoError(t, err)
	defer conn.Close()
	echo := func(s string, within time.Duration) error {
		_ = conn.SetDeadline(time.Now().Add(within))
		if _, err := io.WriteString(conn, s); err != nil {
			return err
		}
		b := make([]byte, len(s))
		_, err := io.ReadFull(conn, b)
		return err
	}
	require.NoError(t, echo("a", 5*time.Second))
	p.setCut(true)
	require.Error(t, echo("b", 200*time.Millisecond), "nothing moves while cut")
	p.setCut(false)
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	_, err = io.ReadFull(conn, b)
	require.NoError(t, err)
	require.Equal(t, "b", string(b), "held bytes move on once healed")
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
