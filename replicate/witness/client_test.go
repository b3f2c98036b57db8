package witness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// usable1s is the validity of a lease of 1s with the default margin.
var usable1s = usable(time.Second, time.Second/10)

func TestAcquireRenewExpireRecover(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	p := newProxy(t, h.addr)
	c := h.client(p.addr(), "primary")
	t0 := clk.Now()
	lease, err := c.Acquire(ctxT(t))
	require.NoError(t, err)
	defer lease.Close()
	require.Equal(t, uint64(1), lease.Generation())
	require.True(t, lease.CanRelease())
	require.Equal(t, t0+usable1s, lease.ValidUntil(), "lease counted from the request's send")
	require.Equal(t, 1, len(h.srv.Records()))

	// Renewals every quarter lease, each counted from its send.
	for i := 1; i <= 3; i++ {
		clk.BlockUntil(t, 1)
		clk.Advance(time.Second / 4)
		clk.BlockUntil(t, 1)
		require.Equal(t, uint64(i), lease.Status().Renewals)
		require.Equal(t, t0+time.Duration(i)*time.Second/4+usable1s, lease.ValidUntil())
	}
	last := lease.ValidUntil()

	// Witness unreachable: renewals fail, the validity runs out by the
	// holder's own clock, and output may not be released.
	p.cut()
	for clk.Now() < last {
		require.True(t, lease.CanRelease())
		clk.BlockUntil(t, 1)
		clk.Advance(time.Second / 8)
	}
	clk.BlockUntil(t, 1)
	require.False(t, lease.CanRelease())
	st := lease.Status()
	require.False(t, st.Valid)
	require.NotZero(t, st.Failures)
	require.Contains(t, st.LastError, "renew vm0")
	require.Nil(t, st.Fenced, "unreachable is not fenced")
	require.Contains(t, h.log.String(), "WITNESS LEASE EXPIRED")

	// The witness answers again: nobody claimed, the lease is renewed.
	p.restore()
	clk.Advance(time.Second / 8)
	clk.BlockUntil(t, 1)
	require.True(t, lease.CanRelease())
	require.Zero(t, lease.Status().Failures)
	require.Equal(t, uint64(1), lease.Generation())
}

// A standby's claim is refused while the primary's lease is valid at the
// witness and granted after; the old primary's validity ended before the
// grant.
func TestClaimWaitsOutTheLease(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pc := h.client(h.addr, "primary")
	pl, err := pc.Acquire(ctxT(t))
	require.NoError(t, err)
	t0 := clk.Now()
	pl.Close() // the primary stops renewing (SIGSTOP, crash, partition)
	require.True(t, pl.CanRelease())

	sc := h.client(h.addr, "standby")
	type res struct {
		l   *Lease
		err error
	}
	done := make(chan res, 1)
	go func() {
		l, err := sc.Claim(ctxT(t), 1)
		done <- res{l, err}
	}()
	var got res
	for {
		clk.BlockUntil(t, 1) // the claim waits on the clock
		select {
		case got = <-done:
		default:
			clk.Advance(10 * time.Millisecond)
			continue
		}
		break
	}
	require.NoError(t, got.err)
	defer got.l.Close()
	granted := clk.Now()
	assert.GreaterOrEqual(t, granted, t0+time.Second, "granted only after the lease ran out at the witness")
	assert.Less(t, pl.ValidUntil(), granted, "the primary had stopped releasing before")
	assert.False(t, pl.CanRelease())
	require.Equal(t, uint64(2), got.l.Generation())
	require.True(t, got.l.CanRelease())
	rec := h.record("vm0")
	require.Equal(t, uint64(2), rec.Generation)
	require.Equal(t, sc.Holder(), rec.Holder)
	require.Contains(t, h.log.String(), "generation granted")
}

// A primary that renews while a standby waits is alive: the claim gives
// up with ErrHolderAlive instead of waiting for ever.
func TestClaimSeesTheHolderAlive(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	defer pl.Close()
	done := make(chan error, 1)
	go func() {
		_, err := h.client(h.addr, "standby").Claim(ctxT(t), 1)
		done <- err
	}()
	clk.BlockUntil(t, 2)          // the primary's renewal and the claim's wait
	clk.Advance(time.Second / 4)  // the primary renews
	clk.BlockUntil(t, 2)          // and waits again
	clk.Advance(time.Millisecond) // the claim asks again
	err = <-done
	require.ErrorIs(t, err, ErrHolderAlive)
	var ref *Refusal
	require.ErrorAs(t, err, &ref)
	require.Equal(t, uint64(1), ref.Record.Generation)
	require.Contains(t, err.Error(), "primary #")
	require.True(t, pl.CanRelease())

	// A fresh primary for the same VM is refused the same way.
	done2 := make(chan error, 1)
	go func() {
		_, err := h.client(h.addr, "intruder").Acquire(ctxT(t))
		done2 <- err
	}()
	clk.BlockUntil(t, 2)
	clk.Advance(time.Second / 4)
	clk.BlockUntil(t, 2)
	clk.Advance(time.Millisecond)
	require.ErrorIs(t, <-done2, ErrHolderAlive)
}

func TestTwoStandbysRaceExactlyOneWins(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	pl.Close()
	clk.Advance(time.Second) // the primary's lease ran out at the witness

	const n = 8
	var wg sync.WaitGroup
	leases := make([]*Lease, n)
	errs := make([]error, n)
	clients := make([]*Client, n)
	for i := range n {
		clients[i] = h.client(h.addr, fmt.Sprintf("standby%d", i))
	}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			leases[i], errs[i] = clients[i].Claim(ctxT(t), 1)
		}()
	}
	wg.Wait()
	winners := 0
	for i := range n {
		if errs[i] == nil {
			winners++
			defer leases[i].Close()
			require.Equal(t, uint64(2), leases[i].Generation())
			require.Equal(t, clients[i].Holder(), h.record("vm0").Holder)
		} else {
			require.ErrorIs(t, errs[i], ErrSuperseded)
		}
	}
	require.Equal(t, 1, winners)
}

func TestFencedPrimaryStaysFenced(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	p := newProxy(t, h.addr)
	pc := h.client(p.addr(), "primary")
	pl, err := pc.Acquire(ctxT(t))
	require.NoError(t, err)
	defer pl.Close()
	p.cut() // the primary is cut off from the witness
	for range 8 {
		clk.BlockUntil(t, 1)
		clk.Advance(time.Second / 8)
	}
	clk.BlockUntil(t, 1)
	require.False(t, pl.CanRelease())
	sl, err := h.client(h.addr, "standby").Claim(ctxT(t), 1)
	require.NoError(t, err)
	defer sl.Close()

	// The partition heals: the primary's next renewal learns of
	// generation 2 and fences it.
	p.restore()
	clk.BlockUntil(t, 2)
	clk.Advance(time.Second / 8)
	select {
	case <-pl.Fenced():
	case <-time.After(10 * time.Second):
		t.Fatal("not fenced")
	}
	var fe *FencedError
	require.ErrorAs(t, pl.Err(), &fe)
	require.Equal(t, uint64(1), fe.Generation)
	require.Equal(t, uint64(2), fe.Current)
	require.Equal(t, sl.Holder(), fe.Holder)
	require.ErrorIs(t, pl.Err(), ErrFenced)
	require.False(t, pl.CanRelease())
	require.Zero(t, pl.ValidUntil())
	require.NotNil(t, pl.Status().Fenced)
	require.Contains(t, h.log.String(), "FENCED")

	// For good: its renewals stopped, it cannot take a generation again,
	// nor advance, even once the new holder is gone.
	sl.Close()
	clk.Advance(10 * time.Second)
	require.False(t, pl.CanRelease())
	_, err = pc.Acquire(ctxT(t))
	require.ErrorIs(t, err, ErrFenced)
	_, err = pc.Claim(ctxT(t), 2)
	require.ErrorIs(t, err, ErrFenced)
	require.ErrorIs(t, pl.Advance(ctxT(t)), ErrFenced)
	require.Equal(t, uint64(2), h.record("vm0").Generation)
}

// The holder's validity is counted from when it sent the request, not
// from when the answer came: a slow answer shortens it.
func TestLeaseCountedFromSend(t *testing.T) {
	clk := newFakeClock()
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
		_, p, err := c.read()
		if err != nil {
			return
		}
		q, err := parseRequest(p)
		if err != nil {
			return
		}
		clk.Advance(300 * time.Millisecond) // the answer takes 300ms
		_ = c.write(frameReply, appendReply(nil, &reply{id: q.id, result: resultOK, lease: time.Second, gen: 1, holder: q.holder}))
		_, _, _ = c.read()
	}()
	h := &harness{t: t, clk: clk, log: &logBuf{}}
	sent := clk.Now()
	l, err := h.client(ln.Addr().String(), "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	defer l.Close()
	require.Equal(t, sent+usable1s, l.ValidUntil())
	require.Equal(t, usable1s-300*time.Millisecond, l.Remaining())
}

func TestAdvanceSupersedesTheOldStandby(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	defer pl.Close()
	clk.BlockUntil(t, 1)
	// The primary lost its standby and goes on alone: it moves to a
	// generation the old standby cannot claim from.
	require.NoError(t, pl.Advance(ctxT(t)))
	require.Equal(t, uint64(2), pl.Generation())
	require.True(t, pl.CanRelease())
	pl.Close()
	clk.Advance(10 * time.Second) // even once the primary is gone
	_, err = h.client(h.addr, "old standby").Claim(ctxT(t), 1)
	require.ErrorIs(t, err, ErrSuperseded)
	require.Contains(t, err.Error(), "generation 2 belongs to")
}

func TestResignHandsOverAtOnce(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "source").Acquire(ctxT(t))
	require.NoError(t, err)
	require.NoError(t, pl.Resign(ctxT(t)))
	require.False(t, pl.CanRelease())
	require.True(t, pl.Status().Resigned)
	dl, err := h.client(h.addr, "destination").Claim(ctxT(t), 1) // no wait
	require.NoError(t, err)
	defer dl.Close()
	require.Equal(t, uint64(2), dl.Generation())
}

func TestWitnessRestartKeepsGenerations(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	pl.Close()
	clk.Advance(time.Second)
	sc := h.client(h.addr, "standby")
	sl, err := sc.Claim(ctxT(t), 1)
	require.NoError(t, err)
	sl.Close()

	h.restart()
	rec := h.record("vm0")
	require.Equal(t, uint64(2), rec.Generation)
	require.Equal(t, sc.Holder(), rec.Holder)
	require.Equal(t, time.Second, rec.Remaining, "after a restart every lease counts as just renewed")
	saved, err := ReadState(h.dir)
	require.NoError(t, err)
	require.Equal(t, []Record{{VM: "vm0", Generation: 2, Holder: sc.Holder(), Lease: time.Second}}, saved)

	// The old primary's generation stays superseded; a claim from 2 must
	// wait a whole lease after the restart.
	_, err = h.client(h.addr, "primary again").Claim(ctxT(t), 1)
	require.ErrorIs(t, err, ErrSuperseded)
	ctx, cancel := context.WithCancel(ctxT(t))
	done := make(chan error, 1)
	go func() {
		_, err := h.client(h.addr, "third").Claim(ctx, 2)
		done <- err
	}()
	clk.BlockUntil(t, 1)
	cancel()
	require.ErrorIs(t, <-done, ErrHeld)
	clk.Advance(time.Second)
	l3, err := h.client(h.addr, "third").Claim(ctxT(t), 2)
	require.NoError(t, err)
	l3.Close()
	require.Equal(t, uint64(3), l3.Generation())
}

func TestStateDirectory(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	_, err := NewServer(ServerConfig{Key: testKey, StateDir: h.dir, Clock: clk})
	require.ErrorIs(t, err, ErrStateInUse, "two witnesses on one state would both grant generations")

	h.stop()
	path := filepath.Join(h.dir, stateFileName)
	for name, content := range map[string]string{
		"garbage":         "not json",
		"other version":   `{"format":"govmm-witness-state","version":9,"vms":[]}`,
		"generation zero": `{"format":"govmm-witness-state","version":1,"vms":[{"vm":"a","generation":0,"holder":"h","lease_ms":1000}]}`,
		"duplicate":       `{"format":"govmm-witness-state","version":1,"vms":[{"vm":"a","generation":1,"holder":"h","lease_ms":1000},{"vm":"a","generation":2,"holder":"h","lease_ms":1000}]}`,
	} {
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
		_, err := NewServer(ServerConfig{Key: testKey, StateDir: h.dir, Clock: clk})
		require.Error(t, err, name)
		require.Contains(t, err.Error(), "witness.json", name)
		t.Logf("%s: %v", name, err)
	}
}

func TestSaveIsAtomic(t *testing.T) {
	dir := t.TempDir()
	st, recs, err := openStore(dir)
	require.NoError(t, err)
	defer st.close()
	require.Empty(t, recs)
	want := []durable{{VM: "a", Generation: 3, Holder: "h #1", Lease: time.Second}}
	require.NoError(t, st.save(want))
	got, err := readState(dir)
	require.NoError(t, err)
	require.Equal(t, want, got)
	_, err = os.Stat(filepath.Join(dir, stateFileName+".tmp"))
	require.ErrorIs(t, err, os.ErrNotExist)
	fi, err := os.Stat(filepath.Join(dir, stateFileName))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// A save that cannot write leaves the old state.
	require.NoError(t, os.Chmod(dir, 0o500))
	defer os.Chmod(dir, 0o700)
	if os.Geteuid() != 0 { // root writes anyway
		require.Error(t, st.save([]durable{{VM: "a", Generation: 4, Holder: "h", Lease: time.Second}}))
		got, err = readState(dir)
		require.NoError(t, err)
		require.Equal(t, want, got)
	}
}

func TestUnreachableAtStart(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	ln.Close()
	c, err := NewClient(Config{Addr: addr, Key: testKey, VM: "vm0", Holder: "primary", Lease: 200 * time.Millisecond, Logger: (&logBuf{}).logger()})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
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

func TestQuery(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	c := h.client(h.addr, "standby")
	_, err := c.Query(ctxT(t))
	require.ErrorIs(t, err, ErrUnknownVM)
	pc := h.client(h.addr, "primary")
	l, err := pc.Acquire(ctxT(t))
	require.NoError(t, err)
	defer l.Close()
	clk.Advance(100 * time.Millisecond)
	rec, err := c.Query(ctxT(t))
	require.NoError(t, err)
	require.Equal(t, Record{VM: "vm0", Generation: 1, Holder: pc.Holder(), Lease: time.Second, Remaining: 900 * time.Millisecond}, rec)
	require.True(t, errors.Is(err, nil))
}

// A Client makes one Lease; once the client is closed, its lease is no
// longer renewed and runs out.
func TestClientOneLeaseAndClose(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	c := h.client(h.addr, "primary")
	l, err := c.Acquire(ctxT(t))
	require.NoError(t, err)
	defer l.Close()
	_, err = c.Acquire(ctxT(t))
	require.ErrorContains(t, err, "already holds generation 1 (one lease per client)")
	_, err = c.Claim(ctxT(t), 1)
	require.ErrorContains(t, err, "one lease per client")

	require.NoError(t, c.Close())
	for clk.Now() < l.ValidUntil() {
		clk.BlockUntil(t, 1)
		clk.Advance(time.Second / 8)
	}
	clk.BlockUntil(t, 1)
	require.False(t, l.CanRelease())
	require.Contains(t, l.Status().LastError, ErrClosed.Error())
	require.Zero(t, l.Status().Renewals)
}
