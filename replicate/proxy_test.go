package replicate

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// proxy sits between primary and standby so tests can cut the link or
// stall one direction, as a dying host or a partition would.
type proxy struct {
	ln          net.Listener
	target      string
	stallBack   atomic.Bool // hold standby->primary bytes (acks, heartbeats)
	stallFwd    atomic.Bool // hold primary->standby bytes
	corruptNext atomic.Bool // flip a byte in the next primary->standby chunk

	closed atomic.Bool

	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{ln: ln, target: target}
	go p.serve()
	t.Cleanup(p.kill)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, err := c.Read(buf)
				for p.stallFwd.Load() && !p.closed.Load() {
					time.Sleep(time.Millisecond)
				}
				if n > 0 {
					if n > 100 && p.corruptNext.CompareAndSwap(true, false) {
						buf[n/2] ^= 0x20
					}
					if _, werr := u.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
		go func() {
			buf := make([]byte, 64<<10)
			for {
				n, err := u.Read(buf)
				for p.stallBack.Load() && !p.closed.Load() {
					time.Sleep(time.Millisecond)
				}
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// kill cuts every connection at once, like a host that died.
func (p *proxy) kill() {
	p.closed.Store(true)
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
