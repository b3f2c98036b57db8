package netback

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"govmm/virtio"
)

// Defaults of the user-mode network, the same as QEMU's slirp so guest
// configuration carries over.
var (
	DefaultUserNetwork = netip.MustParsePrefix("10.0.2.0/24")
	DefaultUserGateway = netip.MustParseAddr("10.0.2.2")
	DefaultUserGuest   = netip.MustParseAddr("10.0.2.15")
	// DefaultGatewayMAC is slirp's gateway MAC address.
	DefaultGatewayMAC = net.HardwareAddr{0x52, 0x55, 0x0a, 0x00, 0x02, 0x02}
)

const (
	nicID = 1

	// dialTimeout bounds a relayed connection's dial, on either side.
	dialTimeout = 10 * time.Second
	// udpIdleTimeout ends a relayed UDP flow that carried nothing this long.
	udpIdleTimeout = 60 * time.Second
	// maxInFlight bounds the guest's half-open outbound connections.
	maxInFlight = 1024
)

// UserConfig configures user-mode networking. The zero value of each field
// but GuestMAC means its default.
type UserConfig struct {
	// GuestMAC is the guest NIC's address. When set, the gateway knows it
	// without asking ARP, so published ports work before the guest speaks.
	GuestMAC net.HardwareAddr
	// GatewayMAC is the gateway's address (DefaultGatewayMAC).
	GatewayMAC net.HardwareAddr

	// Network, Gateway and Guest default to 10.0.2.0/24, 10.0.2.2 and
	// 10.0.2.15. The guest configures its address statically: there is no
	// DHCP server.
	Network netip.Prefix
	Gateway netip.Addr
	Guest   netip.Addr

	// Publish lists host TCP ports forwarded to the guest.
	Publish []Publish

	// Logger receives lifecycle messages; nil means slog.Default().
	Logger *slog.Logger
}

// User is user-mode networking on gVisor's netstack. The netstack plays the
// gateway at Gateway: it answers ARP and ICMP echo, terminates every TCP
// connection and UDP flow the guest opens (to any address) and relays it from
// a host socket, the gateway's own address meaning the host's 127.0.0.1; and
// it dials the guest for each connection accepted on a published port.
type User struct {
	cfg  UserConfig
	log  *slog.Logger
	st   *stack.Stack
	link *frameLink

	ctx    context.Context // cancelled by Close; parent of every dial
	cancel context.CancelFunc

	receiver atomic.Pointer[func([]byte) bool]

	// mu guards closed, started and conns. wg counts the goroutines that
	// Close waits for; add to it only under mu with closed false.
	mu        sync.Mutex
	closed    bool
	started   bool
	conns     map[io.Closer]struct{} // relayed sockets, closed by Close
	listeners []net.Listener
	wg        sync.WaitGroup

	deliverDone chan struct{} // closed when the receive goroutine, started by Start, ends

	// Dropped counts frames the receiver refused.
	dropped atomic.Uint64
}

var _ virtio.NetBackend = (*User)(nil)

// NewUser builds the netstack and listens on the published ports, failing if
// one is taken. Frames flow once Start is called.
func NewUser(cfg UserConfig) (*User, error) {
	if err := cfg.fillDefaults(); err != nil {
		return nil, fmt.Errorf("user network: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	u := &User{
		cfg:         cfg,
		log:         log.With("component", "netback", "backend", "user"),
		conns:       make(map[io.Closer]struct{}),
		deliverDone: make(chan struct{}),
	}
	u.ctx, u.cancel = context.WithCancel(context.Background())
	ok := false
	defer func() {
		if !ok {
			u.Close()
		}
	}()
	if err := u.buildStack(); err != nil {
		return nil, fmt.Errorf("user network: %w", err)
	}
	for _, p := range cfg.Publish {
		l, err := net.Listen("tcp", p.hostAddr())
		if err != nil {
			return nil, fmt.Errorf("publish %s: %w", p.hostAddr(), syscallCause(err))
		}
		u.listeners = append(u.listeners, l)
	}
	ok = true
	return u, nil
}

func (c *UserConfig) fillDefaults() error {
	if c.GatewayMAC == nil {
		c.GatewayMAC = DefaultGatewayMAC
	}
	if err := checkMAC(c.GatewayMAC); err != nil {
		return fmt.Errorf("gateway mac %s: %w", c.GatewayMAC, err)
	}
	if c.GuestMAC != nil {
		if err := checkMAC(c.GuestMAC); err != nil {
			return fmt.Errorf("guest mac %s: %w", c.GuestMAC, err)
		}
	}
	if !c.Network.IsValid() {
		c.Network = DefaultUserNetwork
	}
	if !c.Gateway.IsValid() {
		c.Gateway = DefaultUserGateway
	}
	if !c.Guest.IsValid() {
		c.Guest = DefaultUserGuest
	}
	c.Network = c.Network.Masked()
	for _, a := range []netip.Addr{c.Gateway, c.Guest} {
		if !a.Is4() || !c.Network.Contains(a) {
			return fmt.Errorf("address %s is not an IPv4 address in %s", a, c.Network)
		}
	}
	for _, p := range c.Publish {
		if p.GuestPort == 0 {
			return fmt.Errorf("publish %s: guest port 0", p)
		}
	}
	if c.Gateway == c.Guest {
		return fmt.Errorf("gateway and guest share address %s", c.Gateway)
	}
	return nil
}

// syscallCause strips net's "listen tcp ADDR: bind:" prefix, which the
// caller's context replaces.
func syscallCause(err error) error {
	var op *net.OpError
	if errors.As(err, &op) {
		err = op.Err
	}
	var sc *os.SyscallError
	if errors.As(err, &sc) {
		err = sc.Err
	}
	return err
}

func (u *User) buildStack() error {
	u.st = stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, arp.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4},
		HandleLocal:        false,
	})
	u.link = newFrameLink(tcpip.LinkAddress(u.cfg.GatewayMAC))
	if err := u.st.CreateNIC(nicID, u.link.ep); err != nil {
		return tcpipError("create nic", err)
	}
	// Promiscuous: accept packets for any destination, so the guest's
	// connections to the outside world end here. Spoofing: answer from that
	// destination's address.
	if err := u.st.SetPromiscuousMode(nicID, true); err != nil {
		return tcpipError("set promiscuous mode", err)
	}
	if err := u.st.SetSpoofing(nicID, true); err != nil {
		return tcpipError("set spoofing", err)
	}
	gw := tcpip.AddrFrom4(u.cfg.Gateway.As4())
	if err := u.st.AddProtocolAddress(nicID, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: tcpip.AddressWithPrefix{Address: gw, PrefixLen: u.cfg.Network.Bits()},
	}, stack.AddressProperties{}); err != nil {
		return tcpipError("add gateway address", err)
	}
	// Everything is reached through the guest's link: replies to the guest
	// come from spoofed addresses outside its network.
	u.st.SetRouteTable([]tcpip.Route{{Destination: emptySubnet(), NIC: nicID}})
	if u.cfg.GuestMAC != nil {
		guest := tcpip.AddrFrom4(u.cfg.Guest.As4())
		if err := u.st.AddStaticNeighbor(nicID, ipv4.ProtocolNumber, guest, tcpip.LinkAddress(u.cfg.GuestMAC)); err != nil {
			return tcpipError("add guest neighbor", err)
		}
	}
	tcpFwd := tcp.NewForwarder(u.st, 0, maxInFlight, u.forwardTCP)
	u.st.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(u.st, u.forwardUDP)
	u.st.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)
	return nil
}

func emptySubnet() tcpip.Subnet {
	s, err := tcpip.NewSubnet(tcpip.AddrFrom4([4]byte{}), tcpip.MaskFromBytes(make([]byte, 4)))
	if err != nil {
		panic(err) // constant input
	}
	return s
}

// VnetHdr implements virtio.NetBackend: frames are bare Ethernet.
func (u *User) VnetHdr() bool { return false }

// SetReceiver implements virtio.NetBackend.
func (u *User) SetReceiver(fn func(frame []byte) bool) { u.receiver.Store(&fn) }

// PublishedAddrs returns the host addresses the published ports listen on,
// in the order of UserConfig.Publish; it tells which port a HostPort of 0
// got.
func (u *User) PublishedAddrs() []net.Addr {
	addrs := make([]net.Addr, len(u.listeners))
	for i, l := range u.listeners {
		addrs[i] = l.Addr()
	}
	return addrs
}

// Dropped returns how many frames for the guest the receiver refused.
func (u *User) Dropped() uint64 { return u.dropped.Load() }

// Start implements virtio.NetBackend: it starts delivering frames to the
// receiver and accepting connections on the published ports.
func (u *User) Start() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.closed:
		return fmt.Errorf("user network: start: %w", net.ErrClosed)
	case u.started:
		return errors.New("user network: start: already started")
	case u.receiver.Load() == nil:
		return errors.New("user network: start: no receiver set")
	}
	u.started = true
	go func() {
		defer close(u.deliverDone)
		u.link.run(u.ctx, u.deliver)
	}()
	for i, l := range u.listeners {
		u.wg.Add(1)
		go u.acceptLoop(l, u.cfg.Publish[i])
	}
	u.log.Info("user network started", "gateway", u.cfg.Gateway, "guest", u.cfg.Guest, "published", len(u.listeners))
	return nil
}

func (u *User) deliver(frame []byte) {
	if !(*u.receiver.Load())(frame) {
		u.dropped.Add(1)
	}
}

// Send implements virtio.NetBackend: it puts one Ethernet frame from the
// guest into the netstack, which handles it before Send returns.
func (u *User) Send(frame []byte) error {
	u.mu.Lock()
	closed := u.closed
	u.mu.Unlock()
	if closed {
		return fmt.Errorf("user network: send: %w", net.ErrClosed)
	}
	if err := u.link.inject(frame); err != nil {
		return fmt.Errorf("user network: send: %w", err)
	}
	return nil
}

// Close implements virtio.NetBackend. It closes the listeners and every
// relayed connection, waits for all goroutines and destroys the netstack.
func (u *User) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	u.cancel()
	for _, l := range u.listeners {
		l.Close()
	}
	for c := range u.conns {
		c.Close()
	}
	started := u.started
	u.mu.Unlock()

	u.waitAborting()
	if u.st != nil {
		u.st.Close()
		u.link.close()
		u.st.Wait()
	}
	if started {
		<-u.deliverDone
		u.log.Info("user network stopped")
	}
	return nil
}

// waitAborting waits for the goroutines Close waits for while aborting
// every netstack endpoint, over and over. The repetition is for forwardTCP:
// gVisor's ForwarderRequest.CreateEndpoint blocks until the guest completes
// the handshake, which it never will once frames stop flowing, and an
// endpoint it registers just after one sweep is caught by the next.
func (u *User) waitAborting() {
	done := make(chan struct{})
	go func() {
		u.wg.Wait()
		close(done)
	}()
	if u.st == nil {
		<-done
		return
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		for _, ep := range u.st.RegisteredEndpoints() {
			ep.Abort()
		}
		select {
		case <-done:
			return
		case <-tick.C:
		}
	}
}

// track registers a goroutine that Close waits for and the sockets Close
// closes. It reports false, closing the sockets, once Close has begun.
func (u *User) track(cs ...io.Closer) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	u.wg.Add(1)
	for _, c := range cs {
		u.conns[c] = struct{}{}
	}
	return true
}

// untrack closes the sockets and ends a goroutine registered by track.
func (u *User) untrack(cs ...io.Closer) {
	u.mu.Lock()
	for _, c := range cs {
		c.Close()
		delete(u.conns, c)
	}
	u.mu.Unlock()
	u.wg.Done()
}

// acceptLoop dials the guest for every connection on a published port.
func (u *User) acceptLoop(l net.Listener, p Publish) {
	defer u.wg.Done()
	for {
		hc, err := l.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				u.log.Error("published port stopped accepting", "publish", p.String(), "err", err)
			}
			return
		}
		if !u.track(hc) {
			return
		}
		go u.publishConn(hc, p)
	}
}

func (u *User) publishConn(hc net.Conn, p Publish) {
	ctx, cancel := context.WithTimeout(u.ctx, dialTimeout)
	defer cancel()
	gc, err := gonet.DialTCPWithBind(ctx, u.st,
		tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(u.cfg.Gateway.As4())},
		tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFrom4(u.cfg.Guest.As4()), Port: p.GuestPort},
		ipv4.ProtocolNumber)
	if err != nil {
		// Common while the guest boots; the client sees its connection close.
		u.log.Debug("published connection refused by guest", "publish", p.String(), "err", err)
		u.untrack(hc)
		return
	}
	u.spliceTracked(hc, gc)
}

// spliceTracked relays between a tracked host socket and a new netstack
// connection, then ends the tracked goroutine.
func (u *User) spliceTracked(hc net.Conn, gc net.Conn) {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		gc.Close()
		u.untrack(hc)
		return
	}
	u.conns[gc] = struct{}{}
	u.mu.Unlock()
	splice(hc, gc)
	u.untrack(hc, gc)
}

// splice copies both ways until both directions end. A direction that ends
// cleanly half-closes its destination, so a client's shutdown(SHUT_WR)
// reaches the other side as EOF while data still flows back; an error in
// either direction closes both.
func splice(a, b net.Conn) {
	var wg sync.WaitGroup
	one := func(dst, src net.Conn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			a.Close()
			b.Close()
			return
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			if cw.CloseWrite() == nil {
				return
			}
		}
		dst.Close()
	}
	wg.Add(2)
	go one(a, b)
	one(b, a)
	wg.Wait()
}

// hostAddr maps a destination the guest asked for to the host address to
// dial, refusing the guest's own network apart from the gateway.
func (u *User) hostAddr(dst tcpip.Address, port uint16) (string, bool) {
	a, ok := netip.AddrFromSlice(dst.AsSlice())
	if !ok {
		return "", false
	}
	switch {
	case a == u.cfg.Gateway:
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case u.cfg.Network.Contains(a), a.IsMulticast(), a.IsUnspecified(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "", false
	}
	return net.JoinHostPort(a.String(), strconv.Itoa(int(port))), true
}

// forwardTCP relays a connection the guest opened. It dials the host first
// and completes the guest's handshake only if that succeeds, so the guest
// sees a refusal as a reset, as it would without us in between. gVisor runs
// it on a goroutine of its own.
func (u *User) forwardTCP(r *tcp.ForwarderRequest) {
	id := r.ID()
	dst, ok := u.hostAddr(id.LocalAddress, id.LocalPort)
	if !ok || !u.track() {
		r.Complete(true)
		return
	}
	defer u.wg.Done()
	ctx, cancel := context.WithTimeout(u.ctx, dialTimeout)
	defer cancel()
	var d net.Dialer
	hc, err := d.DialContext(ctx, "tcp", dst)
	if err != nil {
		u.log.Debug("guest connection refused by host", "dst", dst, "err", err)
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		r.Complete(true)
		hc.Close()
		u.log.Debug("guest connection handshake failed", "dst", dst, "err", tcpipError("create endpoint", terr))
		return
	}
	r.Complete(false)
	gc := gonet.NewTCPConn(&wq, ep)
	if !u.track(hc, gc) {
		return
	}
	splice(hc, gc)
	u.untrack(hc, gc)
}

// forwardUDP relays a UDP flow the guest started (DNS, NTP) through a
// connected host socket until it is idle for udpIdleTimeout.
func (u *User) forwardUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst, ok := u.hostAddr(id.LocalAddress, id.LocalPort)
	if !ok {
		return false // the stack answers port unreachable
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		u.log.Debug("guest udp flow not relayed", "dst", dst, "err", tcpipError("create endpoint", terr))
		return true
	}
	gc := gonet.NewUDPConn(&wq, ep)
	if !u.track(gc) {
		return true
	}
	go func() {
		hc, err := net.Dial("udp", dst)
		if err != nil {
			u.log.Debug("guest udp flow not relayed", "dst", dst, "err", err)
			u.untrack(gc)
			return
		}
		u.mu.Lock()
		u.conns[hc] = struct{}{}
		closed := u.closed
		u.mu.Unlock()
		if !closed {
			relayUDP(hc, gc)
		}
		u.untrack(hc, gc)
	}()
	return true
}

// relayUDP copies datagrams both ways until either side fails or the flow
// has been idle for udpIdleTimeout.
func relayUDP(a, b net.Conn) {
	var last atomic.Int64
	touch := func() { last.Store(time.Now().UnixNano()) }
	touch()
	done := make(chan struct{})
	one := func(dst, src net.Conn) {
		buf := make([]byte, 65536)
		for {
			src.SetReadDeadline(time.Now().Add(udpIdleTimeout))
			n, err := src.Read(buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() &&
					time.Since(time.Unix(0, last.Load())) < udpIdleTimeout {
					continue // the other direction is busy
				}
				return
			}
			touch()
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
	}
	go func() {
		one(a, b)
		close(done)
	}()
	one(b, a)
	a.Close()
	b.Close()
	<-done
}
