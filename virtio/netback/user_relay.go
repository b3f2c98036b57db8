package netback

// The user-mode network's relays between the host's sockets and the
// netstack: published ports (host to guest) and the connections and UDP
// flows the guest opens (guest to host). Each relay runs on a goroutine
// that User.track registers, so that Close closes its sockets and waits
// for it.

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// acceptLoop dials the guest for every connection on a published port,
// from when the guest is ready (GuestReady) on.
func (u *User) acceptLoop(l net.Listener, p Publish) {
	defer u.wg.Done()
	select {
	case <-u.ready:
	case <-u.ctx.Done():
		return
	}
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
