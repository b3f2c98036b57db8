package witness

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

// fakeClock is a Clock that moves only when a test says so.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Duration
	timers  []*fakeTimer
	changed chan struct{} // closed and replaced whenever timers changes
}

type fakeTimer struct {
	clk   *fakeClock
	at    time.Duration
	c     chan time.Time
	fired bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Hour, changed: make(chan struct{})} }

func (c *fakeClock) Now() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) notify() {
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *fakeClock) NewTimer(d time.Duration) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{clk: c, at: c.now + d, c: make(chan time.Time, 1)}
	if d <= 0 {
		t.fired = true
		t.c <- time.Time{}
		return t
	}
	c.timers = append(c.timers, t)
	c.notify()
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.c }

func (t *fakeTimer) Stop() bool {
	c := t.clk
	c.mu.Lock()
	defer c.mu.Unlock()
	if i := slices.Index(c.timers, t); i >= 0 {
		c.timers = slices.Delete(c.timers, i, i+1)
		c.notify()
	}
	return !t.fired
}

// Advance moves the clock and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now += d
	kept := c.timers[:0]
	for _, t := range c.timers {
		if t.at <= c.now {
			t.fired = true
			t.c <- time.Time{}
		} else {
			kept = append(kept, t)
		}
	}
	clear(c.timers[len(kept):])
	c.timers = kept
	c.notify()
}

// BlockUntil waits until n timers are pending: the goroutines that own
// them are waiting for the clock, their work done.
func (c *fakeClock) BlockUntil(t testing.TB, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		c.mu.Lock()
		k, ch := len(c.timers), c.changed
		c.mu.Unlock()
		if k >= n {
			return
		}
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("fake clock: %d timers pending after 10s, want %d", k, n)
		}
	}
}

// logBuf collects log lines for assertions.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuf) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// harness is a witness on loopback with a fake clock and a state dir.
type harness struct {
	t    *testing.T
	clk  *fakeClock
	dir  string
	log  *logBuf
	srv  *Server
	addr string
	done chan error
}

func startWitness(t *testing.T, clk *fakeClock) *harness {
	h := &harness{t: t, clk: clk, dir: t.TempDir(), log: &logBuf{}}
	h.start("127.0.0.1:0")
	t.Cleanup(h.stop)
	return h
}

func (h *harness) start(addr string) {
	srv, err := NewServer(ServerConfig{Key: testKey, StateDir: h.dir, Clock: h.clk, Logger: h.log.logger()})
	require.NoError(h.t, err)
	ln, err := net.Listen("tcp", addr)
	require.NoError(h.t, err)
	h.srv, h.addr, h.done = srv, ln.Addr().String(), make(chan error, 1)
	go func() { h.done <- srv.Serve(ln) }()
}

func (h *harness) stop() {
	if h.srv == nil {
		return
	}
	require.NoError(h.t, h.srv.Close())
	require.NoError(h.t, <-h.done)
	h.srv = nil
}

// restart stops the witness and starts a new one on the same address and
// state directory.
func (h *harness) restart() {
	h.stop()
	h.start(h.addr)
}

func (h *harness) record(vm string) Record {
	for _, r := range h.srv.Records() {
		if r.VM == vm {
			return r
		}
	}
	return Record{VM: vm}
}

// client makes a Client of the witness at addr for vm "vm0".
func (h *harness) client(addr, holder string, mod ...func(*Config)) *Client {
	cfg := Config{Addr: addr, Key: testKey, VM: "vm0", Holder: holder, Lease: time.Second,
		RequestTimeout: 5 * time.Second, Clock: h.clk, Logger: h.log.logger()}
	for _, m := range mod {
		m(&cfg)
	}
	c, err := NewClient(cfg)
	require.NoError(h.t, err)
	h.t.Cleanup(func() { c.Close() })
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// proxy forwards TCP to a target; it can be cut (existing connections
// dropped, new ones refused) and restored, and can tamper with what the
// client sends.
type proxy struct {
	t      *testing.T
	ln     net.Listener
	target string

	mu     sync.Mutex
	down   bool
	conns  []net.Conn
	tamper func(off int, b []byte) // client→witness bytes at offset off of the connection
	record *bytes.Buffer           // client→witness bytes, all connections
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{t: t, ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			c.Close()
			continue
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns = append(p.conns, c, s)
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(s, c, true)
		go p.pipe(c, s, false)
	}
}

func (p *proxy) pipe(dst, src net.Conn, up bool) {
	defer p.wg.Done()
	defer dst.Close()
	buf := make([]byte, 4096)
	off := 0
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			if up && p.tamper != nil {
				p.tamper(off, buf[:n])
			}
			if up && p.record != nil {
				p.record.Write(buf[:n])
			}
			p.mu.Unlock()
			off += n
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// cut drops every connection and refuses new ones: a partition.
func (p *proxy) cut() {
	p.mu.Lock()
	p.down = true
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
}

func (p *proxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// rawConn dials addr and runs the client handshake with key.
func rawConn(t *testing.T, addr string, key []byte) *conn {
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(10*time.Second)))
	c := newConn(nc)
	require.NoError(t, c.clientHandshake(key))
	return c
}

// readAll drains nc until EOF (the peer closed it).
func readAll(t *testing.T, nc net.Conn) []byte {
	require.NoError(t, nc.SetDeadline(time.Now().Add(10*time.Second)))
	b, _ := io.ReadAll(nc)
	return b
}
