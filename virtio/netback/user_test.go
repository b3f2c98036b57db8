package netback

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

var (
	testGuestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}
	guestAddr    = tcpip.AddrFrom4(DefaultUserGuest.As4())
	gatewayAddr  = tcpip.AddrFrom4(DefaultUserGateway.As4())
)

// testGuest stands in for a VM: a second netstack at 10.0.2.15 whose frames
// go through the backend's Send and come back through its receiver, exactly
// as a virtio-net device would pass them.
type testGuest struct {
	st     *stack.Stack
	link   *frameLink
	cancel context.CancelFunc
	done   chan struct{}
}

// newUserWithGuest starts a User with cfg wired to a test guest whose
// driver is ready, and closes both when t ends.
func newUserWithGuest(t *testing.T, cfg UserConfig) (*User, *testGuest) {
	t.Helper()
	u, g := newGuestUser(t, cfg, nil)
	u.GuestReady()
	return u, g
}

// newGuestUser is newUserWithGuest without GuestReady; a guest with takes
// set refuses (drops) the frames that arrive while takes says false, as a
// virtio-net device does before its driver is up.
func newGuestUser(t *testing.T, cfg UserConfig, takes func() bool) (*User, *testGuest) {
	t.Helper()
	if cfg.GuestMAC == nil {
		cfg.GuestMAC = testGuestMAC
	}
	cfg.Logger = testLogger(t)
	u, err := NewUser(cfg)
	require.NoError(t, err)

	g := &testGuest{
		st: stack.New(stack.Options{
			NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
			TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
		}),
		link: newFrameLink(tcpip.LinkAddress(cfg.GuestMAC)),
		done: make(chan struct{}),
	}
	require.Nil(t, g.st.CreateNIC(nicID, g.link.ep))
	require.Nil(t, g.st.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: guestAddr, PrefixLen: 24},
	}, stack.AddressProperties{}))
	g.st.SetRouteTable([]tcpip.Route{{Destination: emptySubnet(), Gateway: gatewayAddr, NIC: nicID}})

	u.SetReceiver(func(frame []byte) bool {
		if takes != nil && !takes() {
			return false
		}
		return g.link.inject(frame) == nil
	})
	var ctx context.Context
	ctx, g.cancel = context.WithCancel(context.Background())
	go func() {
		defer close(g.done)
		g.link.run(ctx, func(frame []byte) {
			_ = u.Send(frame) // fails only after Close
		})
	}()
	require.NoError(t, u.Start())
	t.Cleanup(func() {
		assert.NoError(t, u.Close())
		g.close()
	})
	return u, g
}

func (g *testGuest) close() {
	g.cancel()
	<-g.done
	g.st.Close()
	g.link.close()
	g.st.Wait()
}

// serve accepts connections on the guest's TCP port until the stack closes.
func (g *testGuest) serve(t *testing.T, port uint16, handle func(net.Conn)) {
	t.Helper()
	l, err := gonet.ListenTCP(g.st, tcpip.FullAddress{NIC: nicID, Port: port}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
}

func (g *testGuest) dial(t *testing.T, addr tcpip.Address, port uint16) (*gonet.TCPConn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	return gonet.DialContextTCP(ctx, g.st, tcpip.FullAddress{NIC: nicID, Addr: addr, Port: port}, ipv4.ProtocolNumber)
}

// echoUpper reads until EOF, then answers with what it read in upper case.
// It proves half-close: the answer flows after the peer's FIN.
func echoUpper(c net.Conn) {
	b, err := io.ReadAll(c)
	if err != nil {
		return
	}
	c.Write([]byte(strings.ToUpper(string(b))))
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func noProxyClient() *http.Client {
	return &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 10 * time.Second}
}

func TestUserOutboundToHost(t *testing.T) {
	_, g := newUserWithGuest(t, UserConfig{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	remote := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		remote <- c.RemoteAddr().(*net.TCPAddr).IP.String()
		echoUpper(c)
	}()

	port := uint16(l.Addr().(*net.TCPAddr).Port)
	c, err := g.dial(t, gatewayAddr, port)
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("from the guest"))
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	b, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, "FROM THE GUEST", string(b))
	assert.Equal(t, "127.0.0.1", <-remote, "10.0.2.2 is the host's loopback")
}

func TestUserOutboundRefused(t *testing.T) {
	_, g := newUserWithGuest(t, UserConfig{})
	// A port nothing listens on: the guest gets a reset, not a timeout.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := uint16(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	_, err = g.dial(t, gatewayAddr, port)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection was refused")

	// Other addresses of the guest's own network are nobody.
	_, err = g.dial(t, tcpip.AddrFrom4([4]byte{10, 0, 2, 3}), 80)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection was refused")
}

func TestUserUDPToHost(t *testing.T) {
	_, g := newUserWithGuest(t, UserConfig{})
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	defer pc.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(strings.ToUpper(string(buf[:n]))), from)
		}
	}()

	port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	c, err := gonet.DialUDP(g.st, nil, &tcpip.FullAddress{NIC: nicID, Addr: gatewayAddr, Port: port}, ipv4.ProtocolNumber)
	require.NoError(t, err)
	defer c.Close()
	for _, q := range []string{"query one", "query two"} {
		_, err = c.Write([]byte(q))
		require.NoError(t, err)
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		require.NoError(t, err)
		assert.Equal(t, strings.ToUpper(q), string(buf[:n]))
	}
}

// frameUser starts a User whose frames for the guest arrive on a channel,
// for tests that speak in hand-built frames.
func frameUser(t *testing.T) (*User, <-chan []byte) {
	t.Helper()
	u, err := NewUser(UserConfig{GuestMAC: testGuestMAC, Logger: testLogger(t)})
	require.NoError(t, err)
	frames := make(chan []byte, 16)
	u.SetReceiver(func(f []byte) bool {
		select {
		case frames <- append([]byte(nil), f...):
			return true
		default:
			return false
		}
	})
	require.NoError(t, u.Start())
	t.Cleanup(func() { u.Close() })
	return u, frames
}

func nextFrame(t *testing.T, frames <-chan []byte, etherType tcpip.NetworkProtocolNumber) header.Ethernet {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case f := <-frames:
			if eth := header.Ethernet(f); len(f) >= header.EthernetMinimumSize && eth.Type() == etherType {
				return eth
			}
		case <-timeout:
			t.Fatalf("no frame of type %#x", etherType)
		}
	}
}

func TestUserAnswersARP(t *testing.T) {
	u, frames := frameUser(t)
	req := arpFrame(etherTypeARP, arpOpRequest, testGuestMAC, net.IP{10, 0, 2, 15}, make(net.HardwareAddr, 6), net.IP{10, 0, 2, 2})
	require.NoError(t, u.Send(req))

	eth := nextFrame(t, frames, header.ARPProtocolNumber)
	assert.Equal(t, tcpip.LinkAddress(testGuestMAC), eth.DestinationAddress())
	assert.Equal(t, tcpip.LinkAddress(DefaultGatewayMAC), eth.SourceAddress())
	a := header.ARP(eth[header.EthernetMinimumSize:])
	require.True(t, a.IsValid())
	assert.Equal(t, header.ARPReply, a.Op())
	assert.Equal(t, []byte(DefaultGatewayMAC), a.HardwareAddressSender())
	assert.Equal(t, []byte{10, 0, 2, 2}, a.ProtocolAddressSender())
	assert.Equal(t, []byte{10, 0, 2, 15}, a.ProtocolAddressTarget())
}

func TestUserAnswersPing(t *testing.T) {
	u, frames := frameUser(t)
	const ipLen = header.IPv4MinimumSize + header.ICMPv4MinimumSize + 4
	f := make([]byte, header.EthernetMinimumSize+ipLen)
	header.Ethernet(f).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(testGuestMAC),
		DstAddr: tcpip.LinkAddress(DefaultGatewayMAC),
		Type:    header.IPv4ProtocolNumber,
	})
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	ip.Encode(&header.IPv4Fields{
		TotalLength: ipLen, TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
		SrcAddr: guestAddr, DstAddr: gatewayAddr,
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	icmpHdr := header.ICMPv4(ip.Payload())
	icmpHdr.SetType(header.ICMPv4Echo)
	icmpHdr.SetIdent(0x1234)
	icmpHdr.SetSequence(7)
	copy(icmpHdr.Payload(), "ping")
	icmpHdr.SetChecksum(^checksum.Checksum(icmpHdr, 0))
	require.NoError(t, u.Send(f))

	eth := nextFrame(t, frames, header.IPv4ProtocolNumber)
	assert.Equal(t, tcpip.LinkAddress(testGuestMAC), eth.DestinationAddress())
	reply := header.IPv4(eth[header.EthernetMinimumSize:])
	require.True(t, reply.IsValid(len(reply)))
	assert.Equal(t, gatewayAddr, reply.SourceAddress())
	assert.Equal(t, guestAddr, reply.DestinationAddress())
	r := header.ICMPv4(reply.Payload())
	assert.Equal(t, header.ICMPv4EchoReply, r.Type())
	assert.Equal(t, uint16(0x1234), r.Ident())
	assert.Equal(t, uint16(7), r.Sequence())
	assert.Equal(t, "ping", string(r.Payload()))
}

func TestUserConfigErrors(t *testing.T) {
	tests := []struct {
		name    string
		cfg     UserConfig
		wantErr string
	}{
		{"multicast guest mac", UserConfig{GuestMAC: net.HardwareAddr{1, 0, 0x5e, 0, 0, 1}}, "user network: guest mac 01:00:5e:00:00:01: multicast address (low bit of the first byte set), want unicast"},
		{"guest elsewhere in network", UserConfig{Guest: netip.MustParseAddr("10.0.2.4")}, ""},
		{"guest outside network", UserConfig{Guest: netip.MustParseAddr("10.0.3.15")}, "user network: address 10.0.3.15 is not an IPv4 address in 10.0.2.0/24"},
		{"guest port zero", UserConfig{Publish: []Publish{{HostPort: 8080}}}, "user network: publish 127.0.0.1:8080:0: guest port 0"},
		{"guest is gateway", UserConfig{Guest: DefaultUserGateway}, "user network: gateway and guest share address 10.0.2.2"},
		{"bad publish address", UserConfig{Publish: []Publish{{HostAddr: "1.2.3.4.5", GuestPort: 80}}}, "publish 1.2.3.4.5:0: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Logger = testLogger(t)
			u, err := NewUser(tt.cfg)
			if tt.wantErr == "" {
				require.NoError(t, err)
				require.NoError(t, u.Close())
				return
			}
			require.Error(t, err)
			assert.True(t, strings.HasPrefix(err.Error(), tt.wantErr), err.Error())
		})
	}
}

func TestUserLifecycle(t *testing.T) {
	u, err := NewUser(UserConfig{Logger: testLogger(t)})
	require.NoError(t, err)
	assert.False(t, u.VnetHdr())
	assert.EqualError(t, u.Start(), "user network: start: no receiver set")
	u.SetReceiver(func([]byte) bool { return true })
	require.NoError(t, u.Start())
	assert.EqualError(t, u.Start(), "user network: start: already started")
	assert.ErrorIs(t, u.Send(make([]byte, 10)), errShortFrame)
	require.NoError(t, u.Close())
	require.NoError(t, u.Close(), "idempotent")
	assert.ErrorIs(t, u.Send(make([]byte, 60)), net.ErrClosed)
	assert.ErrorIs(t, u.Start(), net.ErrClosed)

	// Closing a User never started also works.
	u, err = NewUser(UserConfig{Publish: []Publish{{GuestPort: 80}}, Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, u.Close())
}

// TestUserCloseWithOpenConnections closes the backend while connections are
// open both ways and idle: Close must end them, not wait for them.
func TestUserCloseWithOpenConnections(t *testing.T) {
	u, g := newUserWithGuest(t, UserConfig{Publish: []Publish{{GuestPort: 7}}})
	g.serve(t, 7, func(c net.Conn) { io.Copy(io.Discard, c) })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go io.Copy(io.Discard, c)
		}
	}()

	in, err := net.Dial("tcp", u.PublishedAddrs()[0].String())
	require.NoError(t, err)
	defer in.Close()
	_, err = in.Write([]byte("x"))
	require.NoError(t, err)
	out, err := g.dial(t, gatewayAddr, uint16(l.Addr().(*net.TCPAddr).Port))
	require.NoError(t, err)
	defer out.Close()

	done := make(chan error)
	go func() { done <- u.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Close blocked on open connections")
	}
	require.NoError(t, in.SetReadDeadline(time.Now().Add(10*time.Second)))
	_, err = in.Read(make([]byte, 1))
	assert.True(t, errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err), "host client sees its connection end: %v", err)
}

// TestUserCloseDuringHandshake leaves a guest connection half open: the
// guest sends a SYN and never answers the SYN-ACK. gVisor's forwarder blocks
// until the handshake ends, and Close must end it.
func TestUserCloseDuringHandshake(t *testing.T) {
	u, frames := frameUser(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := uint16(l.Addr().(*net.TCPAddr).Port)

	const ipLen = header.IPv4MinimumSize + header.TCPMinimumSize
	f := make([]byte, header.EthernetMinimumSize+ipLen)
	header.Ethernet(f).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(testGuestMAC), DstAddr: tcpip.LinkAddress(DefaultGatewayMAC), Type: header.IPv4ProtocolNumber,
	})
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	ip.Encode(&header.IPv4Fields{TotalLength: ipLen, TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: guestAddr, DstAddr: gatewayAddr})
	ip.SetChecksum(^ip.CalculateChecksum())
	tcpHdr := header.TCP(ip.Payload())
	tcpHdr.Encode(&header.TCPFields{SrcPort: 40000, DstPort: port, SeqNum: 1000, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 65535})
	tcpHdr.SetChecksum(^tcpHdr.CalculateChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, guestAddr, gatewayAddr, header.TCPMinimumSize)))
	require.NoError(t, u.Send(f))

	eth := nextFrame(t, frames, header.IPv4ProtocolNumber)
	synAck := header.TCP(header.IPv4(eth[header.EthernetMinimumSize:]).Payload())
	require.Equal(t, header.TCPFlagSyn|header.TCPFlagAck, synAck.Flags(), "the host accepted, so the guest gets a SYN-ACK")

	done := make(chan error)
	go func() { done <- u.Close() }()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("Close blocked on a half-open guest connection")
	}
	assert.Empty(t, waitNoLeftovers(), "goroutines of netback or gVisor remain")
}

func isReset(err error) bool {
	return err != nil && strings.Contains(err.Error(), "connection reset")
}

// TestUserNoGoroutineLeak runs traffic both ways, closes everything and
// checks that no goroutine of ours or of the netstack is left.
func TestUserNoGoroutineLeak(t *testing.T) {
	run := func() {
		t.Run("traffic", func(t *testing.T) {
			TestUserPublishHalfClose(t)
			TestUserOutboundToHost(t)
			TestUserUDPToHost(t)
		})
	}
	run() // warm up anything the runtime or gVisor starts once per process
	before := runtime.NumGoroutine()
	run()
	settle(func() bool { return runtime.NumGoroutine() <= before })
	if n := runtime.NumGoroutine(); n > before {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines before, %d after Close:\n%s", before, n, buf[:runtime.Stack(buf, true)])
	}
	assert.Empty(t, waitNoLeftovers(), "goroutines of netback or gVisor remain")
}

// waitNoLeftovers gives goroutines that are on their way out a moment to
// exit, and returns those that stay.
func waitNoLeftovers() []string {
	var left []string
	settle(func() bool {
		left = leftoverStacks()
		return len(left) == 0
	})
	return left
}

// settle waits until cond holds, for up to 10 s. A goroutine's exit sends
// no event to wait on, so it asks cond again every 20 ms.
func settle(cond func() bool) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			return
		}
	}
}

// leftoverStacks returns the stacks of goroutines that run code of this
// package's user backend or of the netstack.
func leftoverStacks() []string {
	buf := make([]byte, 1<<20)
	var left []string
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "TestUserNoGoroutineLeak") {
			continue
		}
		if strings.Contains(g, "gvisor.dev/gvisor") || strings.Contains(g, "govmm/virtio/netback.(*User)") {
			left = append(left, g)
		}
	}
	return left
}
