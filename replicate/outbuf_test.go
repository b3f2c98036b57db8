package replicate

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// sink is a backend that records what leaves the machine.
type sink struct {
	mu   sync.Mutex
	sent []string
}

func (s *sink) VnetHdr() bool                 { return false }
func (s *sink) SetReceiver(func([]byte) bool) {}
func (s *sink) Start() error                  { return nil }
func (s *sink) Close() error                  { return nil }
func (s *sink) Send(f []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sent = append(s.sent, string(f))
	return nil
}
func (s *sink) got() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.sent...)
}

// armed returns a buffer holding output from the cut of checkpoint first.
func armed(out *sink, first uint64, maxBytes int) *OutputBuffer {
	b := NewOutputBuffer(out, maxBytes)
	b.Arm(first)
	return b
}

func TestOutputHeldUntilAck(t *testing.T) {
	out := &sink{}
	b := armed(out, 0, 0)
	frame := []byte("a1")
	require.NoError(t, b.Send(frame))
	frame[0] = 'X' // the buffer copied it
	require.NoError(t, b.Send([]byte("a2")))
	require.Empty(t, out.got(), "nothing leaves before a checkpoint")
	require.NoError(t, b.Seal(1))
	require.NoError(t, b.Send([]byte("b1")))
	require.NoError(t, b.Seal(2))
	require.NoError(t, b.Send([]byte("c1")))
	require.Empty(t, out.got(), "nothing leaves before an ack")
	require.Equal(t, BufferStats{HeldFrames: 4, HeldBytes: 8}, b.Stats())

	require.NoError(t, b.Release(1))
	require.Equal(t, []string{"a1", "a2"}, out.got())
	require.NoError(t, b.Release(2))
	require.Equal(t, []string{"a1", "a2", "b1"}, out.got(), "epoch 3 is not sealed: c1 stays")
	require.ErrorIs(t, b.Release(3), ErrReleaseOrder)
	require.NoError(t, b.Seal(3))
	require.NoError(t, b.Release(3))
	require.Equal(t, []string{"a1", "a2", "b1", "c1"}, out.got())
}

// Epoch numbers are the replicator's; the buffer refuses any that do not
// increase, and a Seal on a buffer that holds nothing.
func TestOutputSealChecksEpochs(t *testing.T) {
	out := &sink{}
	b := NewOutputBuffer(out, 0)
	require.ErrorIs(t, b.Seal(1), ErrNotArmed)
	b.Arm(5)
	require.ErrorIs(t, b.Seal(5), ErrReleaseOrder, "epoch 5's cut armed the buffer: its output is 6's")
	require.NoError(t, b.Seal(6))
	require.ErrorIs(t, b.Seal(6), ErrReleaseOrder)
	require.ErrorIs(t, b.Seal(4), ErrReleaseOrder)
	require.NoError(t, b.Seal(8), "epochs need only increase")
	require.NoError(t, b.Release(5), "an ack of the arming checkpoint releases nothing")
	require.Empty(t, out.got())
}

func TestOutputReleaseSkipsToLatestAck(t *testing.T) {
	out := &sink{}
	b := armed(out, 9, 0)
	for i, f := range []string{"x", "y", "z"} {
		require.NoError(t, b.Send([]byte(f)))
		require.NoError(t, b.Seal(uint64(10+i)))
	}
	require.NoError(t, b.Release(12)) // acks are cumulative
	require.Equal(t, []string{"x", "y", "z"}, out.got())
	require.NoError(t, b.Release(12), "a repeated ack releases nothing more")
	require.Len(t, out.got(), 3)
}

func TestOutputBounded(t *testing.T) {
	out := &sink{}
	b := armed(out, 0, 4)
	require.NoError(t, b.Send([]byte("abc")))
	require.NoError(t, b.Send([]byte("de"))) // over the bound: dropped, not sent
	require.Equal(t, uint64(1), b.Stats().Dropped)
	require.NoError(t, b.Seal(1))
	require.NoError(t, b.Release(1))
	require.Equal(t, []string{"abc"}, out.got(), "the dropped frame never leaves")
}

func TestOutputBypassIsImmediate(t *testing.T) {
	out := &sink{}
	b := armed(out, 0, 0)
	b.SetBypass(true)
	require.NoError(t, b.Send([]byte("now")))
	require.Equal(t, []string{"now"}, out.got())
}

func TestOutputConcurrentSendAndRelease(t *testing.T) {
	out := &sink{}
	b := armed(out, 0, 0)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 1000; i++ {
			_ = b.Send([]byte{byte(i >> 8), byte(i)})
		}
	}()
	for e := uint64(1); e <= 50; e++ {
		require.NoError(t, b.Seal(e))
		require.NoError(t, b.Release(e))
	}
	wg.Wait()
	require.NoError(t, b.Seal(51))
	require.NoError(t, b.Release(51))
	got := out.got()
	require.Len(t, got, 1000)
	for i, f := range got {
		require.Equal(t, string([]byte{byte(i >> 8), byte(i)}), f, "frames leave in order")
	}
}

func TestOutputAbandonDropsHeld(t *testing.T) {
	out := &sink{}
	b := NewOutputBuffer(out, 0)
	b.Arm(5)
	require.NoError(t, b.Send([]byte("held")))
	require.NoError(t, b.Seal(6))
	b.Abandon()
	require.Empty(t, out.got(), "unacknowledged output is never sent")
	require.NoError(t, b.Send([]byte("later")))
	require.Equal(t, []string{"later"}, out.got(), "unprotected: straight through")
}

// Ending output commit for any reason (standby lost, replication
// stopped, a failed start) drops every frame held for an epoch the
// standby did not acknowledge: none of them is ever sent, and the
// buffer passes later output straight through.
func TestOutputAbandonNeverReleasesUnacked(t *testing.T) {
	out := &sink{}
	b := NewOutputBuffer(out, 0)
	b.Arm(5)
	require.NoError(t, b.Send([]byte("acked")))
	require.NoError(t, b.Seal(6))
	require.NoError(t, b.Send([]byte("sealed, not acked")))
	require.NoError(t, b.Seal(7))
	require.NoError(t, b.Send([]byte("not sealed")))
	require.NoError(t, b.Release(6))
	b.Abandon()
	require.NoError(t, b.Release(7), "a late ack after the end releases nothing")
	require.Equal(t, []string{"acked"}, out.got())
	require.Equal(t, uint64(2), b.Stats().Dropped)
	require.NoError(t, b.Send([]byte("after")))
	require.Equal(t, []string{"acked", "after"}, out.got())
}

// gateSwitch is a gate a test opens and closes (the witness lease's
// CanRelease in production).
type gateSwitch struct{ open atomic.Bool }

func (g *gateSwitch) allow() bool { return g.open.Load() }

// Acknowledged output leaves only while the gate is open: closed, the
// release holds it (nothing dropped, ErrNoLease, counted), and the next
// release once it opens sends it, in order, with what was acknowledged
// meanwhile.
func TestOutputGateHoldsAcknowledgedOutput(t *testing.T) {
	out := &sink{}
	g := &gateSwitch{}
	g.open.Store(true)
	b := armed(out, 0, 0)
	b.SetGate(g.allow)
	require.NoError(t, b.Send([]byte("a")))
	require.NoError(t, b.Seal(1))
	require.NoError(t, b.Release(1))
	require.Equal(t, []string{"a"}, out.got())

	g.open.Store(false)
	require.NoError(t, b.Send([]byte("b1")))
	require.NoError(t, b.Send([]byte("b2")))
	require.NoError(t, b.Seal(2))
	require.ErrorIs(t, b.Release(2), ErrNoLease)
	require.NoError(t, b.Send([]byte("c")))
	require.NoError(t, b.Seal(3))
	require.ErrorIs(t, b.Release(3), ErrNoLease)
	require.Equal(t, []string{"a"}, out.got(), "nothing leaves without a lease")
	st := b.Stats()
	require.Equal(t, 3, st.HeldFrames, "held, not dropped")
	require.Equal(t, uint64(0), st.Dropped)
	require.Equal(t, uint64(2), st.HeldNoLease)

	g.open.Store(true)
	require.NoError(t, b.Send([]byte("d")))
	require.NoError(t, b.Seal(4))
	require.NoError(t, b.Release(3), "a repeated ack after the renewal")
	require.Equal(t, []string{"a", "b1", "b2", "c"}, out.got())
	require.NoError(t, b.Release(4))
	require.Equal(t, []string{"a", "b1", "b2", "c", "d"}, out.got())
	require.Equal(t, 0, b.Stats().HeldFrames)
}

// Output passed straight through (not replicating) leaves only while the
// gate is open; closed, each frame is dropped and counted, never queued.
func TestOutputGateDropsPassThrough(t *testing.T) {
	out := &sink{}
	g := &gateSwitch{}
	b := NewOutputBuffer(out, 0)
	b.SetGate(g.allow)
	require.NoError(t, b.Send([]byte("no lease")))
	g.open.Store(true)
	require.NoError(t, b.Send([]byte("lease")))
	require.Equal(t, []string{"lease"}, out.got())
	require.Equal(t, uint64(1), b.Stats().DroppedNoLease)
	b.SetBypass(true) // the benchmarks' switch does not bypass the gate
	g.open.Store(false)
	require.NoError(t, b.Send([]byte("bypass, no lease")))
	require.Equal(t, []string{"lease"}, out.got())
}

// Fence drops what is held and nothing leaves after it, whatever the gate
// says; a release in progress with a slow backend is waited for, so once
// Fence returns the backend sees no more frames.
func TestOutputFence(t *testing.T) {
	out := &slowSink{started: make(chan struct{}), unblock: make(chan struct{})}
	b := armed(&out.sink, 0, 0)
	b.inner = out
	for i := range 5 {
		require.NoError(t, b.Send([]byte{byte('0' + i)}))
	}
	require.NoError(t, b.Seal(1))
	require.NoError(t, b.Send([]byte("held")))
	released := make(chan error, 1)
	go func() { released <- b.Release(1) }()
	<-out.started // the first frame is being sent
	fenced := make(chan struct{})
	go func() { b.Fence(); close(fenced) }()
	select {
	case <-fenced:
		t.Fatal("Fence returned while a frame was on its way out")
	case <-time.After(20 * time.Millisecond):
	}
	close(out.unblock)
	<-fenced
	require.ErrorIs(t, <-released, ErrOutputFenced)
	sent := out.got()
	require.Equal(t, []string{"0"}, sent, "the frame in flight, then nothing")
	require.NoError(t, b.Send([]byte("after")))
	require.NoError(t, b.Seal(2))
	require.ErrorIs(t, b.Release(2), ErrOutputFenced)
	b.Abandon()
	require.NoError(t, b.Send([]byte("passed through")))
	require.Equal(t, sent, out.got(), "a fenced buffer never sends again")
	st := b.Stats()
	require.True(t, st.Fenced)
	require.Equal(t, uint64(7), st.DroppedFenced, "4 acknowledged but unsent and 1 held, then 2 after")
}

// slowSink blocks its first Send until unblock is closed.
type slowSink struct {
	sink
	once    sync.Once
	started chan struct{}
	unblock chan struct{}
}

func (s *slowSink) Send(f []byte) error {
	first := false
	s.once.Do(func() { first = true })
	if first {
		close(s.started)
		<-s.unblock
	}
	return s.sink.Send(f)
}
