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
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/arp"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

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

	// ready is closed by GuestReady (once: readyOnce): the published
	// ports' accept loops wait for it.
	ready     chan struct{}
	readyOnce sync.Once

	// Dropped counts frames the receiver refused.
	dropped atomic.Uint64
}

var (
	_ virtio.NetBackend         = (*User)(nil)
	_ virtio.GuestReadyNotifier = (*User)(nil)
)

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
		ready:       make(chan struct{}),
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

// GuestReady implements virtio.GuestReadyNotifier: the guest's driver
// takes frames now, so the published ports start accepting.
func (u *User) GuestReady() { u.readyOnce.Do(func() { close(u.ready) }) }

// Dropped returns how many frames for the guest the receiver refused.
func (u *User) Dropped() uint64 { return u.dropped.Load() }

// Start implements virtio.NetBackend: it starts delivering frames to the
// receiver, and accepting connections on the published ports once the
// guest is ready (GuestReady). Until then a client's connection waits in
// the host's listen queue: relayed now, its SYN would be dropped by a
// guest that cannot take frames yet, and netstack would send it again
// only a second later (its initial retransmission timeout), then after 2,
// 4, ... more.
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
