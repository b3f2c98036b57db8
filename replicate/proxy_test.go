package replicate

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

// proxy sits between primary and standby so tests can cut the link or
// stall one direction, as a dying host or a partition would.
type proxy struct {
	ln          net.Listener
	target      string
	stallBack   valve       // hold standby->primary bytes (acks, heartbeats)
	stallFwd    valve       // hold primary->standby bytes
	corruptNext atomic.Bool // flip a byte in the next primary->standby chunk

	killOnce sync.Once
	dead     chan struct{} // closed by kill

	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{ln: ln, target: target, dead: make(chan struct{})}
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
				p.stallFwd.wait(p.dead)
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
				p.stallBack.wait(p.dead)
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
	p.killOnce.Do(func() { close(p.dead) })
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// valve holds one direction's bytes while shut (Store(true)): the
// direction's goroutine waits on it after each read. The zero value is
// open.
type valve struct {
	mu   sync.Mutex
	shut chan struct{} // non-nil while shut; closed when it opens
}

// Store shuts the valve (true) or opens it (false).
func (v *valve) Store(shut bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case shut && v.shut == nil:
		v.shut = make(chan struct{})
	case !shut && v.shut != nil:
		close(v.shut)
		v.shut = nil
	}
}

// wait returns once the valve is open, or dead is closed.
func (v *valve) wait(dead <-chan struct{}) {
	v.mu.Lock()
	ch := v.shut
	v.mu.Unlock()
	if ch == nil {
		return
	}
	select {
	case <-ch:
	case <-dead:
	}
}
