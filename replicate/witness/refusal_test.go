package witness

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// refusingAddr is a loopback address that refuses connections: a TCP
// socket bound to it but not listening, kept open until the test ends so
// that no other test or process can take the port meanwhile (a CI run's
// dial to a closed port timed out instead of being refused once: another
// listener, it seems, had its port).
func refusingAddr(t *testing.T) string {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fd) })
	require.NoError(t, unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}))
	sa, err := unix.Getsockname(fd)
	require.NoError(t, err)
	return fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port)
}

func TestUnreachableAtStart(t *testing.T) {
	addr := refusingAddr(t)
	c, err := NewClient(Config{Addr: addr, Key: testKey, VM: "vm0", Holder: "primary", Lease: 200 * time.Millisecond, RequestTimeout: time.Second, Logger: (&logBuf{}).logger()})
	require.NoError(t, err)
	// Long enough that a dial completes on a loaded host: the default
	// request timeout (a quarter of the lease, 50 ms) ran out before the
	// refusal under -race in a CI run, and 300 ms for the whole call did.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = c.Acquire(ctx)
	require.Error(t, err)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, err.Error(), "witness "+addr+": acquire vm0: gave up")
	require.Contains(t, err.Error(), "connection refused")
}

func TestConfigRefusals(t *testing.T) {
	good := Config{Addr: "127.0.0.1:1", Key: testKey, VM: "vm0", Holder: "p"}
	for name, mod := range map[string]func(*Config){
		"no port":      func(c *Config) { c.Addr = "127.0.0.1" },
		"no key":       func(c *Config) { c.Key = nil },
		"short key":    func(c *Config) { c.Key = []byte("short") },
		"no vm":        func(c *Config) { c.VM = "" },
		"control char": func(c *Config) { c.VM = "a\nb" },
		"tiny lease":   func(c *Config) { c.Lease = time.Millisecond },
		"huge margin":  func(c *Config) { c.Margin = time.Second },
	} {
		cfg := good
		mod(&cfg)
		_, err := NewClient(cfg)
		require.Error(t, err, name)
		t.Logf("%s: %v", name, err)
	}
	_, err := NewClient(good)
	require.NoError(t, err)
}

func TestWrongKeyRefused(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	bad := bytes.Repeat([]byte("k"), 32)
	_, err := h.client(h.addr, "intruder", func(c *Config) { c.Key = bad }).Acquire(ctxT(t))
	require.ErrorIs(t, err, ErrAuth)
	require.Contains(t, err.Error(), "authentication failed (wrong key?)")
	require.Empty(t, h.srv.Records())
	require.Equal(t, uint64(1), h.srv.Stats().Refused)
	require.Contains(t, h.log.String(), "refused a client")

	// A fake witness (wrong key) cannot grant anything either: the
	// client refuses its proof.
	fake := startWitness(t, clk)
	fake.stop()
	srv, err := NewServer(ServerConfig{Key: bad, StateDir: t.TempDir(), Clock: clk, Logger: h.log.logger()})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go srv.Serve(ln)
	defer srv.Close()
	_, err = h.client(ln.Addr().String(), "primary").Acquire(ctxT(t))
	require.ErrorIs(t, err, ErrAuth)
}

// A request changed on the way (one bit of its ciphertext) does not
// authenticate: the witness refuses it and grants nothing.
func TestForgedRequestRefused(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	p := newProxy(t, h.addr)
	handshake := headerSize + helloSize + headerSize + proofSize
	p.tamper = func(off int, b []byte) {
		if i := handshake + headerSize + 2 - off; i >= 0 && i < len(b) {
			b[i] ^= 0x10
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := h.client(p.addr(), "primary").Acquire(ctx)
	require.Error(t, err)
	require.Empty(t, h.srv.Records())
	require.Contains(t, h.log.String(), "does not authenticate (forged or corrupted)")
}

// Bytes recorded from one session and played into a new connection fail
// the handshake (the witness's nonce is new); a frame played twice within
// a session fails its sequence number.
func TestReplayRefused(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	p := newProxy(t, h.addr)
	p.record = &bytes.Buffer{}
	c := h.client(p.addr(), "primary")
	l, err := c.Acquire(ctxT(t))
	require.NoError(t, err)
	l.Close()
	c.Close()
	clk.Advance(time.Minute) // the lease ran out: a replayed acquire would win generation 2
	recorded := p.record.Bytes()

	nc, err := net.Dial("tcp", h.addr)
	require.NoError(t, err)
	defer nc.Close()
	_, err = nc.Write(recorded)
	require.NoError(t, err)
	back := readAll(t, nc)
	require.Contains(t, string(back), "authentication failed")
	require.Equal(t, uint64(1), h.record("vm0").Generation, "the replay granted nothing")

	// Within a session.
	rc := rawConn(t, h.addr, testKey)
	q := request{op: opStatus, id: 1, vm: "vm0"}
	require.NoError(t, rc.write(frameRequest, appendRequest(nil, &q)))
	frame := bytes.Clone(rc.wbuf)
	typ, _, err := rc.read()
	require.NoError(t, err)
	require.Equal(t, frameReply, typ)
	_, err = rc.nc.Write(frame)
	require.NoError(t, err)
	_, _, err = rc.read()
	require.Error(t, err) // the witness hangs up
	require.Eventually(t, func() bool {
		return bytes.Contains([]byte(h.log.String()), []byte("sequence number 2, want 3 (replayed, reordered or dropped)"))
	}, 10*time.Second, 5*time.Millisecond)
}

func TestTruncatedFramesRefused(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	// truncate sends b, closes its side and waits for the witness to
	// hang up (it logs the refusal first).
	truncate := func(nc net.Conn, b []byte) {
		_, err := nc.Write(b)
		require.NoError(t, err)
		require.NoError(t, nc.(*net.TCPConn).CloseWrite())
		readAll(t, nc)
	}
	refused := func(n uint64) { require.Equal(t, n, h.srv.Stats().Refused) }
	// Half a hello.
	nc, err := net.Dial("tcp", h.addr)
	require.NoError(t, err)
	defer nc.Close()
	hb := make([]byte, headerSize)
	putHeader(hb, header{length: helloSize, typ: frameHello})
	truncate(nc, append(hb, helloMagic...))
	refused(1)
	require.Contains(t, h.log.String(), "truncated hello frame")

	// Half a sealed request.
	rc := rawConn(t, h.addr, testKey)
	q := request{op: opStatus, id: 1, vm: "vm0"}
	require.NoError(t, rc.write(frameRequest, appendRequest(nil, &q)))
	typ, _, err := rc.read()
	require.NoError(t, err)
	require.Equal(t, frameReply, typ)
	q.id = 2
	payload := appendRequest(nil, &q)
	var hdr [headerSize]byte
	putHeader(hdr[:], header{length: uint32(len(payload)), typ: frameRequest, seq: rc.wseq})
	whole := rc.wseal.Seal(bytes.Clone(hdr[:]), rc.nonceFor(rc.wseq), payload, hdr[:])
	truncate(rc.nc, whole[:len(whole)-5])
	refused(2)
	require.Contains(t, h.log.String(), "truncated request frame")

	// A well-sealed request that is not a request.
	rc = rawConn(t, h.addr, testKey)
	require.NoError(t, rc.write(frameRequest, []byte{9, 9, 9}))
	typ, p, err := rc.read()
	require.NoError(t, err)
	require.Equal(t, frameError, typ)
	msg, err := parseErrorFrame(p)
	require.NoError(t, err)
	require.Contains(t, msg, "truncated")
	refused(3)

	// The client's side: a reply cut short.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		c := newConn(nc)
		if c.witnessHandshake(testKey) != nil {
			return
		}
		for i := range 2 {
			_, p, err := c.read()
			if err != nil {
				return
			}
			q, _ := parseRequest(p)
			rep := reply{id: q.id, result: resultOK, lease: time.Second, gen: 1, holder: "primary"}
			if i == 0 {
				_ = c.write(frameReply, appendReply(nil, &rep))
				continue
			}
			var hdr [headerSize]byte
			payload := appendReply(nil, &rep)
			putHeader(hdr[:], header{length: uint32(len(payload)), typ: frameReply, seq: c.wseq})
			b := c.wseal.Seal(bytes.Clone(hdr[:]), c.nonceFor(c.wseq), payload, hdr[:])
			_, _ = nc.Write(b[:len(b)/2])
			_ = nc.(*net.TCPConn).CloseWrite()
			_, _ = io.Copy(io.Discard, nc)
		}
	}()
	c := h.client(ln.Addr().String(), "primary")
	_, err = c.Query(ctxT(t)) // a whole answer first
	require.NoError(t, err)
	_, err = c.Query(ctxT(t))
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Contains(t, err.Error(), "truncated reply frame")
}
