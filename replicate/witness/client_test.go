package witness

import (
	"errors"
	"fmt"
	"net"
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
