package replicate

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// cutRecorder keeps copies of the primary's memory at the last few cuts.
type cutRecorder struct {
	m    *vmm.Machine
	mu   sync.Mutex
	cuts map[uint64][]byte
}

func (c *cutRecorder) at(epoch uint64) {
	r := c.m.Memory().Regions()[0]
	cp := append([]byte(nil), r.Host...)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cuts[epoch] = cp
	for e := range c.cuts {
		if e+4 < epoch {
			delete(c.cuts, e)
		}
	}
}

func (c *cutRecorder) get(epoch uint64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cuts[epoch]
}

// buildTiny builds a standby's machine for the primary's identity.
func buildTiny(id stream.Identity) (Replica, error) {
	m, err := vmm.New(vmm.Config{MemSize: MemSize(id), CPUs: int(id.VCPUs), Console: io.Discard})
	return Replica{Machine: m}, err
}

func newStandby(t *testing.T, before func(*vmm.Machine, *vmm.MachineState) error) *Standby {
	return newStandbyDeltas(t, before, false)
}

// newStandbyDeltas is newStandby, accepting deltas or not.
func newStandbyDeltas(t *testing.T, before func(*vmm.Machine, *vmm.MachineState) error, deltas bool) *Standby {
	t.Helper()
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Build: buildTiny, FailoverTimeout: 10 * time.Second,
		Deltas: deltas})
	require.NoError(t, err)
	sb.beforeStart = before
	t.Cleanup(func() { sb.Close() })
	return sb
}

type takeover struct {
	m   *vmm.Machine
	tk  Takeover
	err error
}

// The primary replicates a guest that dirties memory continuously; the
// link dies; the standby resumes from its last committed checkpoint, whose
// memory equals the primary's at that cut page by page (every dirty page
// shipped, checkpoints atomic), and the guest runs on there.
//
// With S2, and with deltas on top; copying on write (the pages are
// copied after the resume while the Dirtier writes them: the cut holds
// only if every write to a page not yet copied waits for its copy) and
// stopping to copy.
func TestReplicationFailover(t *testing.T) {
	for _, tc := range []struct {
		deltas bool
		copy   CopyMode
	}{{false, CopyCoW}, {true, CopyCoW}, {false, CopyStop}} {
		t.Run(fmt.Sprintf("deltas=%v/copy=%s", tc.deltas, tc.copy), func(t *testing.T) { testReplicationFailover(t, tc.deltas, tc.copy) })
	}
}

func testReplicationFailover(t *testing.T, deltas bool, copyMode CopyMode) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, dirtyPages, passGPA))
	require.NoError(t, prim.Start())
	rec := &cutRecorder{m: prim, cuts: map[uint64][]byte{}}

	var lastCommitted uint64
	var compared, differ int
	sb := newStandbyDeltas(t, nil, deltas)
	sb.onCheckpoint = func(e uint64) { lastCommitted = e }
	sb.beforeStart = func(m *vmm.Machine, st *vmm.MachineState) error {
		want := rec.get(lastCommitted)
		if want == nil {
			return fmt.Errorf("no recorded cut for epoch %d", lastCommitted)
		}
		got := m.Memory().Regions()[0].Host
		for off := 0; off < len(got); off += guestmem.PageSize {
			compared++
			if !bytes.Equal(got[off:off+guestmem.PageSize], want[off:off+guestmem.PageSize]) {
				differ++
			}
		}
		return nil
	}
	done := make(chan takeover, 1)
	go func() {
		m, tk, err := sb.ReceiveReplication(context.Background())
		done <- takeover{m, tk, err}
	}()
	px := newProxy(t, sb.Addr())
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second, Deltas: deltas, Compression: stream.CompressS2,
		Copy: copyMode}, testHooks{atCut: rec.at})
	require.NoError(t, err)
	t.Cleanup(rep.Stop) // before the machine closes
	// Ten checkpoints, and more than one pass of the Dirtier's pages in
	// them: how many pages an epoch holds is up to the guest's speed (in
	// the lab, with another L1 on the same CPUs, tens per 20 ms).
	require.Eventually(t, func() bool {
		st := rep.Stats()
		return st.Epochs >= 10 && st.DirtyPages > dirtyPages
	}, 30*time.Second, time.Millisecond, "ten checkpoints carrying more than %d dirty pages", dirtyPages)
	st := rep.Stats()
	ws := rep.t.Stats()
	t.Logf("%d checkpoints (epoch %d, acked %d): %d dirty pages, %d bytes; stream since the sync began: %d pages, %d page bytes in %d on the wire, %d state bytes in %d on the wire in %d checkpoints",
		st.Epochs, st.Epoch, st.Acked, st.DirtyPages, st.Bytes, ws.Pages, ws.PageBytes, ws.PageWireBytes, ws.StateBytes, ws.StateWireBytes, ws.Checkpoints)
	require.Equal(t, string(copyMode), st.Last.CopyMode)
	if copyMode == CopyCoW {
		// The Dirtier runs on from the resume into pages the copier has
		// not reached: its writes fault (through KVM) and wait for the copy.
		require.Eventually(t, func() bool { return rep.cow.Stats().Faults > 0 }, 30*time.Second, time.Millisecond,
			"the guest's writes to protected pages fault")
		require.Positive(t, rep.Recent()[0].Background)
	}
	require.True(t, st.Protected)
	// Compressed (S2): the Dirtier's pages are one byte over zeroes, and
	// the wire carries a small fraction of them. (Of the pages' bytes: a
	// checkpoint's device state, ~18 KB, outweighs its pages where the
	// guest dirtied few in an epoch.)
	require.Positive(t, st.Bytes)
	require.Less(t, ws.PageWireBytes, (ws.Pages-ws.ZeroPages)*guestmem.PageSize/10, "pages travel compressed")
	require.Equal(t, "s2", ws.Compression)
	require.Equal(t, deltas, ws.Deltas)
	// The machine state travels as its XOR with the last checkpoint's,
	// compressed (stream version 13): from one epoch to the next little
	// of it changes (registers, clocks, counters).
	require.Less(t, ws.StateWireBytes, ws.StateBytes/4, "the machine state travels as a compressed XOR with the last one")
	// Whether any page travels as a delta here is up to timing: the
	// Dirtier bumps one byte per page, whose XOR with the last version
	// has as many non-zero words as the page itself, so only a page shipped
	// again unchanged (dirtied while the initial sync read it) goes as a
	// delta. stream's TestDeltaChainsAcrossEpochs shows deltas in use; here
	// the standby's memory, built from them, is checked page by page.
	require.Greater(t, st.Pause.Sum, time.Duration(0))
	require.Equal(t, st.Epochs, st.Pause.Count, "every checkpoint's pause is in the histogram")

	// The primary's host dies: the guest stops there and the link is cut.
	require.NoError(t, prim.Pause())
	px.kill()
	r := <-done
	require.NoError(t, r.err)
	defer r.m.Close()
	require.GreaterOrEqual(t, r.tk.Epoch, st.Epoch-1)
	t.Logf("takeover at epoch %d after %v: %v", r.tk.Epoch, r.tk.Took, r.tk.Cause)

	require.Equal(t, lastCommitted, r.tk.Epoch)
	require.Equal(t, 64<<20/guestmem.PageSize, compared)
	require.Zero(t, differ, "standby memory equals the primary's at the cut of epoch %d", r.tk.Epoch)

	// The guest runs on at the standby from the cut.
	atCut := passes(t, r.m)
	require.Eventually(t, func() bool { return passes(t, r.m) > atCut+2 }, 30*time.Second, time.Millisecond)

	<-rep.Done()
	require.ErrorIs(t, rep.Err(), ErrStandbyLost)
	require.False(t, rep.Stats().Protected)
}

// Output commit on a replicated guest: while the standby's acks are held
// back, not one frame the guest sends leaves (and the epoch stretches
// rather than piling up checkpoints); when acks flow again, the held
// frames arrive, all of them, in order.
func TestReplicationOutputCommit(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	wire := &sink{}
	out := NewOutputBuffer(wire, 0)

	sb := newStandby(t, nil)
	go func() {
		m, _, err := sb.ReceiveReplication(context.Background())
		if err == nil {
			m.Close()
		}
	}()
	px := newProxy(t, sb.Addr())
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second, Outputs: []*OutputBuffer{out}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop) // before the machine closes

	// Protected and acks flowing: output gets out, one epoch late.
	require.NoError(t, out.Send([]byte("hello")))
	require.Eventually(t, func() bool { return len(wire.got()) == 1 }, 10*time.Second, time.Millisecond)

	// Partition the acks. Acks already in flight may still arrive, but
	// only for checkpoints numbered by now (epochs are numbered at the
	// cut): none taken from here on is acknowledged.
	px.stallBack.Store(true)
	cut := rep.Stats().Epoch
	var want []string
	for i := 0; i < 20; i++ {
		f := fmt.Sprintf("frame-%02d", i)
		want = append(want, f)
		require.NoError(t, out.Send([]byte(f)))
		time.Sleep(10 * time.Millisecond) // the frames spread over several epochs
	}
	time.Sleep(200 * time.Millisecond) // the scenario: more epochs pass with the acks held back
	require.Equal(t, []string{"hello"}, wire.got(), "no output leaves without its ack")
	st := rep.Stats()
	require.LessOrEqual(t, st.Acked, cut, "no checkpoint taken during the partition is acknowledged")
	require.LessOrEqual(t, st.Epoch, st.Acked+DefaultMaxUnacked, "backpressure: no more checkpoints in flight than allowed")
	require.Positive(t, st.Backpressured, "the epoch stretched, waiting for the standby")
	require.False(t, prim.Paused())
	require.Equal(t, 20, out.Stats().HeldFrames)

	px.stallBack.Store(false)
	require.Eventually(t, func() bool { return len(wire.got()) == 21 }, 10*time.Second, time.Millisecond)
	require.Equal(t, append([]string{"hello"}, want...), wire.got(), "held frames arrive in order")
}

// A corrupted frame: the standby closes the stream with a clear error,
// applies nothing of that checkpoint and does not take over; the primary
// runs on, unprotected. (Keyed: every frame's tag catches the flip, as
// ErrAuth. Without a key a flipped page byte is caught at its
// checkpoint's End instead: TestInsecureCorruptPagesNeverCommitted.)
func TestReplicationCorruptFrame(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	key := []byte("0123456789abcdef0123456789abcdef")
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Key: key, Build: buildTiny, FailoverTimeout: 10 * time.Second})
	require.NoError(t, err)
	t.Cleanup(func() { sb.Close() })
	refused := make(chan error, 4)
	sb.cfg.OnRefused = func(err error) { refused <- err }
	errc := make(chan error, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		m, _, err := sb.ReceiveReplication(ctx)
		if m != nil {
			m.Close()
		}
		errc <- err
	}()
	px := newProxy(t, sb.Addr())
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Key: key, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.Eventually(t, func() bool { return rep.Stats().Epochs >= 3 }, 30*time.Second, time.Millisecond)
	px.corruptNext.Store(true) // flip one byte primary -> standby
	err = <-refused
	require.ErrorIs(t, err, stream.ErrAuth)
	require.Contains(t, err.Error(), "not taking over")
	select {
	case err := <-errc:
		t.Fatalf("the standby stopped waiting: %v", err)
	default:
	}
	select {
	case <-rep.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the primary did not notice the standby closing the stream")
	}
	require.ErrorIs(t, rep.Err(), ErrStandbyLost)
	require.False(t, prim.Paused(), "continue policy: the guest runs on unprotected")
	before := passes(t, prim)
	require.Eventually(t, func() bool { return passes(t, prim) > before }, 30*time.Second, time.Millisecond)

	// The standby still listens: the primary is protected by it again.
	rep.Stop()
	rep2, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Key: key, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second})
	require.NoError(t, err)
	require.True(t, rep2.Stats().Protected)
	rep2.Stop()
	require.ErrorContains(t, <-errc, "stopped replication")
}

// With --on-standby-loss=pause the primary stops its guest when the
// standby goes away, and keeps its output held; the operator's Stop then
// resumes the guest, unprotected, and the held output is dropped, never
// sent.
func TestReplicationStandbyLossPause(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	wire := &sink{}
	out := NewOutputBuffer(wire, 0)
	sb := newStandby(t, nil)
	go func() {
		m, _, _ := sb.ReceiveReplication(context.Background())
		if m != nil {
			m.Close()
		}
	}()
	px := newProxy(t, sb.Addr())
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second, OnStandbyLoss: OnStandbyLossPause, Outputs: []*OutputBuffer{out}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	px.stallBack.Store(true)
	require.NoError(t, out.Send([]byte("unacked")))
	px.kill()
	<-rep.Done()
	require.ErrorIs(t, rep.Err(), ErrStandbyLost)
	require.True(t, prim.Paused(), "pause policy: the guest stops")
	require.Empty(t, wire.got(), "unacknowledged output stays held")
	require.Equal(t, 1, out.Stats().HeldFrames)

	rep.Stop()
	require.False(t, prim.Paused(), "Stop is the operator's decision: the guest runs on")
	require.Empty(t, wire.got(), "the unacknowledged frame is dropped, not released")
	require.NoError(t, out.Send([]byte("later")))
	require.Equal(t, []string{"later"}, wire.got(), "unprotected now: output flows")
	before := passes(t, prim)
	require.Eventually(t, func() bool { return passes(t, prim) > before }, 30*time.Second, time.Millisecond)
}

// The null transport: checkpoints are taken (and timed) but go nowhere;
// each is acknowledged at once, so output is released every epoch.
func TestReplicationToNull(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	wire := &sink{}
	out := NewOutputBuffer(wire, 0)
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{Transport: NewNullTransport(), Name: "tiny",
		Epoch: 10 * time.Millisecond, Outputs: []*OutputBuffer{out}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.NoError(t, out.Send([]byte("x")))
	require.Eventually(t, func() bool { return rep.Stats().Epochs >= 5 && len(wire.got()) == 1 }, 30*time.Second, time.Millisecond)
	st := rep.Stats()
	require.True(t, st.Protected)
	require.GreaterOrEqual(t, st.Acked+1, st.Epoch, "each acknowledged as it ends (the last may be in flight)")
	require.Zero(t, st.Bytes, "nothing shipped")
	require.Greater(t, st.DirtyPages, uint64(0))
}

// The initial sync reports its progress as it goes: every few MiB of the
// first full copy of memory, in order, reaching the whole of memory at the
// end of round 1, then the later rounds on top.
func TestReplicationSyncProgress(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, dirtyPages, passGPA))
	require.NoError(t, prim.Start())
	sb := newStandby(t, nil)
	go func() { _, _, _ = sb.ReceiveReplication(context.Background()) }()
	var got []SyncProgress // written by StartReplication's goroutine, read after it returns
	// At round 1's first update the VMM writes more pages than a round
	// may leave dirty (stopPages: 256), so a second round must send them:
	// the guest alone cannot be relied on for that (in the lab, the
	// Dirtier dirtied too few pages during round 1 once).
	const written = 512
	var writeErr error
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second, Progress: func(p SyncProgress) {
			if len(got) == 0 {
				writeErr = prim.Memory().WriteAt(bytes.Repeat([]byte{0xa5}, written*guestmem.PageSize), 0x2000000)
			}
			got = append(got, p)
		}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.NoError(t, writeErr)
	total := prim.Memory().Size()
	require.NotEmpty(t, got)
	var inRound1, endRound1 int
	for i, p := range got {
		require.Equal(t, total, p.Total, "update %d", i)
		if i > 0 {
			require.GreaterOrEqual(t, p.Round, got[i-1].Round, "update %d", i)
			require.GreaterOrEqual(t, p.Copied, got[i-1].Copied, "update %d", i)
		}
		switch {
		case p.Round == 1 && p.Copied < total:
			inRound1++
		case p.Round == 1 && p.Copied == total:
			endRound1++
		}
	}
	require.GreaterOrEqual(t, inRound1, int(total/progressEvery)-1, "updates during the first copy of 64 MiB")
	require.Positive(t, endRound1, "round 1 ends with all of memory copied")
	last := got[len(got)-1]
	require.Equal(t, 1, got[0].Round)
	require.Less(t, got[0].Copied, total, "the VMM's writes came during round 1")
	require.GreaterOrEqual(t, last.Copied, total+written*guestmem.PageSize, "pages written during round 1 travel again in later rounds")
	require.True(t, last.Acking, "the last update: the first checkpoint's ack is awaited")
	for _, p := range got[:len(got)-1] {
		require.False(t, p.Acking)
	}
}
