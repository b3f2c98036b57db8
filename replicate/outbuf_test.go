package replicate

import (
	"sync"
	"testing"

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
