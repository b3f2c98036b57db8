package stream

import (
	"bytes"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A receiver busy in OnCommit (a slow disk sync, say) for ten failover
// timeouts: it does not count that time as the sender's silence, its
// heartbeats keep the sender from declaring it lost, and the checkpoint
// commits and is acknowledged once the work is done.
func TestBusyReceiverIsNotSilence(t *testing.T) {
	clock := newFakeClock()
	scfg, rcfg := cfgs(clock)
	entered, release := make(chan struct{}), make(chan struct{})
	rcfg.OnCommit = func(c *Checkpoint) error {
		if c.Epoch == 2 {
			close(entered)
			<-release
		}
		return nil
	}
	s, r := tcpStreamPair(t, scfg, rcfg)
	run := runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 4, []byte("s")))
	require.NoError(t, s.WaitAck(t.Context(), 1))
	require.NoError(t, sendCheckpoint(s, 2, KindEpoch, 4, []byte("s")))
	<-entered
	step := r.detectEvery()
	for range int(10 * DefaultFailoverTimeout / step) {
		clock.Step(t, step, 1)
		// Fake time must not outrun the loopback: wait for the receiver's
		// due heartbeat to reach the sender, and, while the receiver
		// listens (its reader has a slot free), for the sender's to reach
		// it (on a loaded host a heartbeat can take many steps' real time
		// to cross, and the receiver's detector would count that).
		due := clock.Now().Add(-DefaultHeartbeatInterval)
		require.Eventually(t, func() bool {
			return !s.LastHeard().Before(due) && (!r.listening.Load() || !r.LastHeard().Before(due))
		}, 5*time.Second, 100*time.Microsecond)
	}
	assert.NoError(t, r.Err(), "the receiver's own busy time is not the sender's silence")
	assert.NoError(t, s.Err(), "the busy receiver's heartbeats keep flowing")
	assert.Greater(t, r.Stats().Heartbeats, uint64(10))
	close(release)
	require.NoError(t, s.WaitAck(ctxTimeout(t, 5*time.Second), 2))
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}

// throttle forwards the receiver's bytes back freely, and the sender's
// freely until gate, then only as the test allows (a slow link).
type throttle struct {
	gated atomic.Bool
	allow chan int // bytes the sender may get through next
	sent  chan int // how many went
}

func newThrottle(t *testing.T) (*throttle, net.Conn, net.Conn) {
	s1, s2 := net.Pipe()
	r1, r2 := net.Pipe()
	th := &throttle{allow: make(chan int), sent: make(chan int)}
	go func() {
		defer r1.Close()
		buf := make([]byte, 64<<10)
		for {
			n := len(buf)
			gated := th.gated.Load()
			if gated {
				select {
				case n = <-th.allow:
				case <-t.Context().Done():
					return
				}
			}
			k, err := s2.Read(buf[:n])
			if k > 0 {
				if _, werr := r1.Write(buf[:k]); werr != nil {
					return
				}
			}
			if gated {
				th.sent <- k
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		defer s2.Close()
		_, _ = io.Copy(s2, r1)
	}()
	return th, s1, r2
}

// A checkpoint crossing a slow link: the sender cannot beat (its clock
// never moves), but every byte that arrives is life to the receiver, for
// ten timeouts and more. Once bytes stop, the receiver declares the sender
// lost when the timeout has passed, not before.
func TestBytesInTransitAreLife(t *testing.T) {
	th, sc, rc := newThrottle(t)
	sclock, rclock := newFakeClock(), newFakeClock()
	scfg, rcfg := cfgs(sclock)
	rcfg.Clock = rclock
	scfg.Compression = CompressNone // a checkpoint of many bytes
	s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	th.gated.Store(true)
	run := runReceiver(t, r)
	go func() { _ = sendCheckpoint(s, 1, KindEpoch, 1024, []byte("s")) }()

	step := r.detectEvery()
	need := int(DefaultFailoverTimeout / step)
	// Each step waits for the receiver's detector to judge its tick, and
	// each chunk for the receiver to have heard it, so fake time never
	// outruns the goroutines it is measured against.
	judged := func(n int) {
		for range n {
			before := r.judged.Load()
			rclock.Step(t, step, 1)
			require.Eventually(t, func() bool { return r.judged.Load() > before || r.Err() != nil }, 5*time.Second, 100*time.Microsecond)
		}
	}
	for range 10 * need {
		th.allow <- 8 << 10
		require.Positive(t, <-th.sent)
		now := rclock.Now().UnixNano()
		require.Eventually(t, func() bool { return r.lastHeard.Load() == now }, 5*time.Second, 100*time.Microsecond)
		judged(1)
	}
	assert.NoError(t, r.Err(), "a trickle of bytes is life")
	judged(need - 1)
	assert.NoError(t, r.Err(), "not before the timeout")
	judged(2)
	require.ErrorIs(t, waitErr(t, run), ErrTimeout)
}

// The two ends announce their failover timeouts in the hello and both
// use the larger.
func TestTimeoutsNegotiated(t *testing.T) {
	for _, tt := range []struct{ s, r, want time.Duration }{
		{time.Second, 3 * time.Second, 3 * time.Second},
		{5 * time.Second, time.Second, 5 * time.Second},
		{2 * time.Second, 2 * time.Second, 2 * time.Second},
	} {
		scfg, rcfg := cfgs(newFakeClock())
		scfg.FailoverTimeout, rcfg.FailoverTimeout = tt.s, tt.r
		s, r := pipePair(t, scfg, rcfg)
		assert.Equal(t, tt.want, s.FailoverTimeout())
		assert.Equal(t, tt.want, r.FailoverTimeout())
	}
}

// During a partition the sender's failure detector fires although its
// checkpoint writer is blocked in a write that cannot progress, and the
// blocked write and Close return promptly.
func TestPartitionDetectedWhileWriteBlocked(t *testing.T) {
	// The link dies in the middle of the checkpoint's first frame (its
	// Begin, which goes out at once): the checkpoint's writer is blocked
	// in that write, holding the writer, so no heartbeat gets through
	// either.
	partitioned := make(chan struct{})
	sc, rc := partitionProxy(t, partitioned)
	sclock := newFakeClock()
	scfg, rcfg := cfgs(sclock)
	rcfg.Clock = newFakeClock()
	s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	_ = r
	blocked := make(chan error, 1)
	go func() { blocked <- sendCheckpoint(s, 1, KindEpoch, 2000, bytes.Repeat([]byte("s"), 1<<20)) }()
	<-partitioned
	// The reader listens before fake time moves: a tick it meets not yet
	// listening restarts the count, and the steps below are just enough
	// (CI's busy host once ran the reader two ticks late).
	require.Eventually(t, s.listening.Load, 5*time.Second, time.Millisecond)
	sclock.Step(t, s.detectEvery(), int(DefaultFailoverTimeout/s.detectEvery())+1)
	select {
	case err := <-blocked:
		require.Error(t, err)
		require.ErrorIs(t, s.Err(), ErrTimeout)
	case <-time.After(10 * time.Second):
		t.Fatal("the checkpoint writer is still blocked after the peer was declared lost")
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close hangs during a partition")
	}
}

// A receiver that is alive (its heartbeats arrive) but takes nothing: the
// sender's write gives up after the stall timeout with ErrStalled instead
// of waiting forever, and the receiver, told so, does not count it as the
// sender's death.
func TestStalledReceiverFailsSender(t *testing.T) {
	scfg, rcfg := cfgs(nil)
	scfg.Clock, rcfg.Clock = SystemClock{}, SystemClock{}
	for _, c := range []*Config{&scfg, &rcfg} {
		c.HeartbeatInterval, c.FailoverTimeout, c.StallTimeout = 25*time.Millisecond, 100*time.Millisecond, 200*time.Millisecond
	}
	s, r := pipePair(t, scfg, rcfg) // r never runs: it beats, but reads nothing
	start := time.Now()
	err := sendCheckpoint(s, 1, KindEpoch, 2000, nil)
	if err == nil {
		err = s.WaitAck(ctxTimeout(t, 10*time.Second), 1)
	}
	require.ErrorIs(t, err, ErrStalled)
	t.Logf("stalled after %v: %v", time.Since(start), err)
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.NotErrorIs(t, r.Err(), ErrTimeout, "the receiver never listened, so it blames no one for silence")
}

// A goodbye inside a checkpoint is a deliberate end: the receiver aborts
// the checkpoint, keeps the last committed one, and Run returns nil (no
// takeover); a goodbye after a final checkpoint is a migration the source
// aborted, not a handover.
func TestGoodbyeAbortsOpenCheckpoint(t *testing.T) {
	t.Run("inside a checkpoint", func(t *testing.T) {
		scfg, rcfg := cfgs(newFakeClock())
		sink := NewMemSink()
		rcfg.Sink = sink
		s, r := pipePair(t, scfg, rcfg)
		run := runReceiver(t, r)
		require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("s")))
		require.NoError(t, s.WaitAck(t.Context(), 1))
		require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
		require.NoError(t, s.SendPage(0, page(77)))
		require.NoError(t, s.flushPages())
		require.NoError(t, s.Close())
		require.NoError(t, waitErr(t, run))
		assert.False(t, r.HandedOver())
		assert.Equal(t, uint64(1), r.Committed())
		assert.Equal(t, page(1000), sink.Page(0))
		assert.Zero(t, sink.Staged())
	})
	t.Run("after a final checkpoint", func(t *testing.T) {
		scfg, rcfg := cfgs(newFakeClock())
		s, r := pipePair(t, scfg, rcfg)
		run := runReceiver(t, r)
		require.NoError(t, sendCheckpoint(s, 1, KindFinal, 3, []byte("s")))
		require.NoError(t, s.WaitAck(t.Context(), 1))
		require.NoError(t, s.Close()) // the source resumed: abort
		require.NoError(t, waitErr(t, run))
		assert.False(t, r.HandedOver(), "only a handover frame hands over")
		assert.Equal(t, uint64(1), r.LastResumable())
	})
}

// Disk writes travel in Disk frames beside the pages, zero runs without
// bytes; an epoch's writes land only at its commit; a checkpoint carries
// at most MaxCheckpointDisk, checked by the sender before the wire.
func TestDiskWrites(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	disks := newMemDisks(4<<20, 1<<20)
	rcfg.Disks = disks
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)

	data := bytes.Repeat([]byte("disk!"), (3<<20)/5)
	before := s.Stats().BytesSent
	require.NoError(t, s.BeginCheckpoint(1, KindInitialSync))
	require.NoError(t, s.SendPage(0, page(1)))
	require.NoError(t, s.SendDisk(0, 0, data))
	require.NoError(t, s.SendDisk(1, 4096, make([]byte, 1<<19)))
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(t.Context(), 1))
	sent := s.Stats().BytesSent - before
	assert.Less(t, sent, uint64(len(data))+PageSize+64<<10, "the zero run travelled without its bytes")
	assert.Equal(t, data, disks.disk(0)[:len(data)])

	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	require.NoError(t, s.SendDisk(1, 0, []byte("staged")))
	require.ErrorIs(t, s.SendDisk(0, 0, make([]byte, MaxCheckpointDisk)), ErrTooLarge)
	assert.Equal(t, make([]byte, 6), disks.disk(1)[:6], "not before the commit")
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(t.Context(), 2))
	assert.Equal(t, []byte("staged"), disks.disk(1)[:6])
	assert.Equal(t, uint64(len(data)+1<<19+6), r.Stats().DiskBytes)

	// Out of the sink's range: refused, nothing applied, the sender told.
	require.NoError(t, s.BeginCheckpoint(3, KindEpoch))
	require.NoError(t, s.SendDisk(1, 1<<20-2, []byte("over")))
	require.NoError(t, s.EndCheckpoint())
	require.ErrorIs(t, s.WaitAck(ctxTimeout(t, 5*time.Second), 3), ErrCommit)
	require.ErrorIs(t, waitErr(t, run), ErrCommit)
	assert.Equal(t, 2, disks.commits)
}

// A zero run costs ZeroRunCost per frame toward MaxCheckpointDisk, not
// its length (version 11): one checkpoint zeroes far more than the cap
// (a guest discarding its whole disk), while data past the cap is still
// refused, and the runs and the writes between them apply in order.
func TestDiskZeroRunsCost(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	disks := newMemDisks(4 << 20)
	rcfg.Disks = disks
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)

	require.NoError(t, s.BeginCheckpoint(1, KindInitialSync))
	require.NoError(t, s.SendDisk(0, 0, bytes.Repeat([]byte{7}, 4<<20)))
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(t.Context(), 1))

	const rounds = 2 * MaxCheckpointDisk / (4 << 20) // 512 MiB zeroed in all
	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	for i := range rounds {
		require.NoError(t, s.SendDisk(0, int64(i%4)<<20, []byte{byte(i + 1)}))
		require.NoError(t, s.SendDiskZero(0, 0, 4<<20), "round %d", i)
	}
	require.NoError(t, s.SendDisk(0, 4096, []byte("kept")))
	big := MaxCheckpointDisk - int(ZeroCost(4<<20))*rounds - rounds - 4 + 1
	require.ErrorIs(t, s.SendDisk(0, 0, make([]byte, big)), ErrTooLarge, "data still counts its bytes")
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(t.Context(), 2))

	want := make([]byte, 4<<20)
	copy(want[4096:], "kept")
	assert.Equal(t, want, disks.disk(0), "the last run zeroed what the writes before it wrote")
	assert.Equal(t, uint64(4<<20+rounds*(1+4<<20)+4), r.Stats().DiskBytes)
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}
