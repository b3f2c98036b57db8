package stream

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

func TestCheckpointsCommittedAtomicallyAndAckedInOrder(t *testing.T) {
	var (
		mu      sync.Mutex
		commits []*Checkpoint
	)
	scfg, rcfg := cfgs(newFakeClock())
	sink := NewMemSink()
	rcfg.Sink = sink
	rcfg.OnCommit = func(c *Checkpoint) error {
		// Nothing of this checkpoint is visible yet.
		mu.Lock()
		kept := *c
		kept.State = bytes.Clone(c.State) // the callee's only until OnCommit returns
		commits = append(commits, &kept)
		mu.Unlock()
		if c.Epoch > 1 {
			assert.Equal(t, page((c.Epoch-1)*1000), sink.Page(0))
		}
		return nil
	}
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)

	state := bytes.Repeat([]byte("machine state "), 200_000) // > MaxStateChunk: several frames
	kinds := []Kind{KindInitialSync, KindInitialSync, KindEpoch, KindEpoch, KindFinal}
	for i, k := range kinds {
		if k == KindFinal {
			require.ErrorIs(t, s.Handover(), ErrProtocol, "no handover without a final checkpoint")
		}
		require.NoError(t, sendCheckpoint(s, uint64(i+1), k, 300, state))
	}
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 5))
	require.ErrorIs(t, s.BeginCheckpoint(6, KindEpoch), ErrProtocol, "nothing after final")
	st := s.Stats()
	require.NoError(t, s.Handover())
	require.NoError(t, waitErr(t, run))
	assert.True(t, r.HandedOver())

	assert.Equal(t, uint64(5), s.Acked())
	require.Len(t, commits, 5)
	for i, c := range commits {
		assert.Equal(t, uint64(i+1), c.Epoch)
		assert.Equal(t, kinds[i], c.Kind)
		assert.Equal(t, uint64(300), c.Pages)
		assert.Equal(t, uint64(100), c.ZeroPages)
		assert.Equal(t, state, c.State)
	}
	assert.Equal(t, uint64(5), r.Committed())
	assert.Equal(t, uint64(5), r.LastResumable())
	for i := range 300 {
		want := page(5000 + uint64(i))
		if i%3 == 2 {
			want = make([]byte, PageSize)
		}
		require.Equal(t, want, sink.Page(GPA(i*PageSize)), "page %d", i)
	}
	rt := r.Stats()
	assert.LessOrEqual(t, st.BytesSent, rt.BytesReceived, "everything sent arrived (and the handover after it)")
	assert.Equal(t, uint64(5), st.Acks)
	assert.Equal(t, uint64(5), rt.Checkpoints)
}

func TestCommitRefusedCommitsNothing(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	sink := NewMemSink()
	rcfg.Sink = sink
	rcfg.OnCommit = func(c *Checkpoint) error { return errors.New("state does not decode") }
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 10, []byte("x")))
	err := s.WaitAck(ctxTimeout(t, 5*time.Second), 1)
	require.ErrorIs(t, err, ErrPeer)
	require.ErrorIs(t, err, ErrCommit)
	require.ErrorIs(t, waitErr(t, run), ErrCommit)
	assert.Zero(t, sink.Len())
	assert.Zero(t, sink.Staged())
	assert.Zero(t, r.Committed())
}

// TestTamperedFrameDetected flips one byte at many places in the stream:
// every one is caught and nothing of the checkpoint is committed.
func TestTamperedFrameDetected(t *testing.T) {
	// Frames from the sender: 0 hello, 1 auth, 2 begin, 3-4 pages (300
	// pages: 256 + 44), 5 state, 6 end.
	type spot struct{ frame, off int }
	var spots []spot
	for fr := 2; fr <= 6; fr++ {
		for _, off := range []int{0, 3, 4, 5, 8, 15, 16, 17, 20, 30, -1, -32} {
			spots = append(spots, spot{fr, off})
		}
	}
	spots = append(spots, spot{3, 16 + 4 + 8}, spot{3, 16 + 4 + 16 + 100}, spot{4, 16 + 4 + 5*4112 + 4000})
	for _, sp := range spots {
		t.Run(fmt.Sprintf("frame %d byte %d", sp.frame, sp.off), func(t *testing.T) {
			t.Parallel()
			sc, rc := proxy(t, func(i int, f []byte) [][]byte {
				if i == sp.frame {
					off := sp.off
					if off < 0 {
						off += len(f)
					}
					f[off] ^= 0x40
				}
				return [][]byte{f}
			})
			scfg, rcfg := cfgs(newFakeClock())
			sink := NewMemSink()
			rcfg.Sink = sink
			s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
			require.NoError(t, serr)
			require.NoError(t, rerr)
			run := runReceiver(t, r)
			_ = sendCheckpoint(s, 1, KindEpoch, 300, []byte("state"))
			ctx := ctxTimeout(t, 2*time.Second)
			if err := s.WaitAck(ctx, 1); err == nil {
				t.Fatal("tampered checkpoint acknowledged")
			} else if ctx.Err() != nil {
				s.Close() // a grown length field waits for bytes that never come
			}
			err := waitErr(t, run)
			require.Error(t, err)
			if !errors.Is(err, ErrAuth) && !errors.Is(err, ErrTooLarge) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("want ErrAuth, ErrTooLarge or ErrTruncated, got %v", err)
			}
			if sp.off >= headerSize || sp.off < 0 {
				require.ErrorIs(t, err, ErrAuth, "payload and mac bytes are covered by the mac")
			}
			assert.Zero(t, r.Committed())
			assert.Zero(t, sink.Len())
			assert.Zero(t, sink.Staged())
		})
	}
}

func TestReplayedReorderedDroppedFrames(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(i int, f []byte, prev *[]byte) [][]byte
	}{
		{"replayed", func(i int, f []byte, prev *[]byte) [][]byte {
			if i == 3 {
				return [][]byte{f, bytes.Clone(f)}
			}
			return [][]byte{f}
		}},
		{"reordered", func(i int, f []byte, prev *[]byte) [][]byte {
			switch i {
			case 3:
				*prev = f
				return nil
			case 4:
				return [][]byte{f, *prev}
			}
			return [][]byte{f}
		}},
		{"dropped", func(i int, f []byte, prev *[]byte) [][]byte {
			if i == 4 {
				return nil
			}
			return [][]byte{f}
		}},
		{"frame from the handshake replayed", func(i int, f []byte, prev *[]byte) [][]byte {
			if i == 1 {
				*prev = bytes.Clone(f)
			}
			if i == 3 {
				return [][]byte{*prev}
			}
			return [][]byte{f}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var prev []byte
			sc, rc := proxy(t, func(i int, f []byte) [][]byte { return tt.mutate(i, f, &prev) })
			scfg, rcfg := cfgs(newFakeClock())
			sink := NewMemSink()
			rcfg.Sink = sink
			s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
			require.NoError(t, serr)
			require.NoError(t, rerr)
			run := runReceiver(t, r)
			_ = sendCheckpoint(s, 1, KindEpoch, 300, []byte("state"))
			err := waitErr(t, run)
			require.ErrorIs(t, err, ErrAuth)
			assert.Contains(t, err.Error(), "sequence")
			assert.Zero(t, sink.Len())
			assert.ErrorIs(t, s.WaitAck(t.Context(), 1), ErrAuth)
		})
	}
}

func TestTruncatedStream(t *testing.T) {
	tests := []struct {
		name string
		cut  func(s *Sender, sc net.Conn)
		want string
	}{
		{"connection closed mid-checkpoint", func(s *Sender, sc net.Conn) { sc.Close() }, "inside checkpoint 2"},
		{"connection cut mid-frame", func(s *Sender, sc net.Conn) {
			s.wmu.Lock()
			_ = s.fw.write(framePages, stored(appendPageEntry([]byte{1, 0, 0, 0}, 0, container.EncRaw, page(1))))
			_ = s.fw.bw.Flush()
			s.wmu.Unlock()
		}, "inside pages frame"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Once armed, the next Pages frame is cut: half of it
			// forwarded, then the link.
			var armed atomic.Bool
			cutting := false // the proxy goroutine's
			sc, rc := proxy(t, func(_ int, f []byte) [][]byte {
				if cutting || armed.Load() && frameType(f[4]) == framePages {
					cutting = true
					return [][]byte{f[:len(f)/2], nil} // forward half, then cut
				}
				return [][]byte{f}
			})
			scfg, rcfg := cfgs(newFakeClock())
			sink := NewMemSink()
			rcfg.Sink = sink
			s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
			require.NoError(t, serr)
			require.NoError(t, rerr)
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 20, []byte("state")))
			require.NoError(t, s.WaitAck(t.Context(), 1))
			require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
			for i := range 20 {
				require.NoError(t, s.SendPage(GPA(i*PageSize), page(99)))
			}
			if tt.name == "connection cut mid-frame" {
				armed.Store(true)
				// The sealer writes this Pages frame (over 64 KiB: past
				// the buffer) at once, and the proxy cuts it: the stream
				// may fail before flushPages returns.
				_ = s.flushPages()
				tt.cut(s, sc)
				// The proxy forwarded half a frame; now the link dies.
				sc.Close()
			} else {
				require.NoError(t, s.flushPages())
				s.wmu.Lock()
				require.NoError(t, s.fw.flush())
				s.wmu.Unlock()
				tt.cut(s, sc)
			}
			err := waitErr(t, run)
			require.ErrorIs(t, err, ErrTruncated)
			assert.Contains(t, err.Error(), tt.want)
			var se *StreamError
			require.ErrorAs(t, err, &se)
			assert.Equal(t, uint64(2), se.Epoch)
			assert.Equal(t, uint64(1), r.Committed())
			assert.Equal(t, page(1000), sink.Page(0), "checkpoint 1 stays, nothing of 2")
			assert.Zero(t, sink.Staged())
		})
	}
}

// forge sends an authenticated frame that an honest Sender would refuse to
// build: a compromised or buggy primary.
func forge(t *testing.T, s *Sender, typ frameType, payload []byte) {
	t.Helper()
	require.NoError(t, s.send(typ, payload, true))
}

func TestReceiverRefusesBadFrames(t *testing.T) {
	id := testIdentity()
	pages := func(gpa GPA, enc container.Encoding, data []byte) []byte {
		return stored(appendPageEntry([]byte{1, 0, 0, 0}, gpa, enc, data))
	}
	tests := []struct {
		name  string
		begin bool
		typ   frameType
		body  []byte
		want  error
	}{
		{"page outside layout", true, framePages, pages(8<<20, container.EncRaw, page(1)), ErrOutOfRange},
		{"page in the gap between regions", true, framePages, pages(1<<31, container.EncZero, nil), ErrOutOfRange},
		{"page straddling a region end", true, framePages, pages(GPA(id.Regions[0].Size-PageSize/2), container.EncZero, nil), ErrFrame},
		{"unaligned page", true, framePages, pages(8, container.EncRaw, page(1)), ErrFrame},
		{"delta on a session without deltas", true, framePages, pages(0, container.EncXOR, []byte{1, 2}), ErrFrame},
		{"short raw page", true, framePages, pages(0, container.EncRaw, make([]byte, 100)), ErrFrame},
		{"pages outside a checkpoint", false, framePages, pages(0, container.EncZero, nil), ErrProtocol},
		{"state outside a checkpoint", false, frameState, stored([]byte("x")), ErrProtocol},
		{"empty state chunk", true, frameState, stored(nil), ErrFrame},
		{"state chunk with an unknown base", true, frameState, append([]byte{byte(codecStored), 2, 0, 0, 1, 0, 0, 0}, 'x'), ErrFrame},
		{"state chunk with reserved bytes set", true, frameState, append([]byte{byte(codecStored), 0, 0, 1, 1, 0, 0, 0}, 'x'), ErrFrame},
		{"nested begin", true, frameBegin, appendBegin(nil, 2, KindEpoch), ErrProtocol},
		{"epoch not increasing", false, frameBegin, appendBegin(nil, 1, KindEpoch), ErrProtocol},
		{"initial sync after an epoch", false, frameBegin, appendBegin(nil, 7, KindInitialSync), ErrProtocol},
		{"end of another epoch", true, frameEnd, appendEnd(nil, endInfo{epoch: 3}), ErrProtocol},
		{"end with wrong page count", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, pages: 1}), ErrChecksum},
		{"end with wrong sum", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, sum: 1}), ErrChecksum},
		{"end with huge state length", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, stateLen: 1 << 40}), ErrTooLarge},
		{"ack from the sender", false, frameAck, make([]byte, 8), ErrProtocol},
		{"accept from the sender", false, frameAccept, nil, ErrProtocol},
		{"handover without a final checkpoint", false, frameHandover, nil, ErrProtocol},
		{"disk write outside a checkpoint", false, frameDisk, diskPayload(0, 0, 1, []byte{1}), ErrProtocol},
		{"disk write to a receiver without disks", true, frameDisk, diskPayload(0, 0, 1, []byte{1}), ErrProtocol},
		{"disk number beyond the cap", true, frameDisk, diskPayload(MaxDisks, 0, 1, []byte{1}), ErrOutOfRange},
		{"end with wrong disk byte count", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, pages: 1, diskBytes: 1}), ErrChecksum},
		{"hello after the handshake", false, frameHello, appendHello(nil, &hello{version: Version, keyed: true, role: roleSender, id: id,
			heartbeat: time.Second, timeout: 4 * time.Second}), ErrProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			sink := NewMemSink()
			rcfg.Sink = sink
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("s")))
			require.NoError(t, s.WaitAck(t.Context(), 1))
			if tt.begin {
				require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
				require.NoError(t, s.SendPage(PageSize, page(5)))
				require.NoError(t, s.flushPages())
			}
			forge(t, s, tt.typ, tt.body)
			err := waitErr(t, run)
			require.ErrorIs(t, err, tt.want)
			t.Logf("receiver: %v", err)
			assert.Equal(t, uint64(1), r.Committed())
			assert.Equal(t, page(1001), sink.Page(PageSize))
			assert.Zero(t, sink.Staged())
			// The sender hears why.
			serr := s.WaitAck(ctxTimeout(t, 5*time.Second), 2)
			require.ErrorIs(t, serr, ErrPeer)
			require.ErrorIs(t, serr, tt.want)
		})
	}
}

func TestOversizedFrameRefusedBeforeAllocation(t *testing.T) {
	var hdr [headerSize]byte
	putHeader(hdr[:], header{length: 0xffff_fff0, typ: framePages, seq: 0})
	var ctr counters
	fr := newFrameReader(bytes.NewReader(append(hdr[:], make([]byte, 100)...)), &ctr)
	_, err := fr.next()
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Zero(t, cap(fr.cur.buf), "nothing allocated for the payload")

	// And over a live stream.
	scfg, rcfg := cfgs(newFakeClock())
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	putHeader(hdr[:], header{length: MaxFramePayload + 1, typ: frameState, seq: s.fw.seq})
	s.wmu.Lock()
	_, _ = s.fw.bw.Write(hdr[:])
	_ = s.fw.flush()
	s.wmu.Unlock()
	err = waitErr(t, run)
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Less(t, cap(r.fr.cur.buf), MaxFramePayload)
}

func TestSenderRefusesBadCalls(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	s, r := pipePair(t, scfg, rcfg)
	require.ErrorIs(t, s.SendPage(0, page(1)), ErrProtocol, "no checkpoint open")
	require.ErrorIs(t, s.EndCheckpoint(), ErrProtocol)
	require.ErrorIs(t, s.BeginCheckpoint(0, KindEpoch), ErrProtocol)
	runReceiver(t, r) // a Begin goes out at once: something must read it
	require.NoError(t, s.BeginCheckpoint(1, KindEpoch))
	require.ErrorIs(t, s.BeginCheckpoint(2, KindEpoch), ErrProtocol, "nested")
	require.ErrorIs(t, s.SendPage(8<<20, page(1)), ErrOutOfRange)
	require.ErrorIs(t, s.SendPage(3, page(1)), ErrOutOfRange)
	require.ErrorIs(t, s.SendPage(0, page(1)[:100]), ErrFrame)
	require.ErrorIs(t, s.SendState(make([]byte, MaxState+1)), ErrTooLarge)
	assert.NoError(t, s.Err(), "caller mistakes do not break the stream")
}

func TestZeroPagesElided(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	sink := NewMemSink()
	rcfg.Sink = sink
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)

	send := func(epoch uint64, zero bool) uint64 {
		before := s.Stats().BytesSent
		require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
		for i := range 512 {
			p := page(uint64(i) + 1)
			if zero {
				p = make([]byte, PageSize)
			}
			require.NoError(t, s.SendPage(GPA(i*PageSize), p))
		}
		require.NoError(t, s.EndCheckpoint())
		require.NoError(t, s.WaitAck(t.Context(), epoch))
		return s.Stats().BytesSent - before
	}
	raw := send(1, false)
	zero := send(2, true)
	t.Logf("512 pages: %d bytes raw, %d bytes zero", raw, zero)
	assert.Less(t, zero*50, raw, "zero pages cost under 2%% of raw ones")
	assert.Equal(t, make([]byte, PageSize), sink.Page(100*PageSize), "zero page overwrote the raw one")
	assert.Equal(t, uint64(512), r.Stats().ZeroPages)
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
	assert.False(t, r.HandedOver(), "no final checkpoint: not a handover")
}

func TestHeartbeatsKeepPeerAlive(t *testing.T) {
	clock := newFakeClock()
	scfg, rcfg := cfgs(clock)
	for _, c := range []*Config{&scfg, &rcfg} {
		c.HeartbeatInterval, c.FailoverTimeout = 100*time.Millisecond, 300*time.Millisecond
	}
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	clock.waitTickers(t, 2)
	for i := range 20 { // 2 s of fake time, well past the timeout
		clock.Advance(100 * time.Millisecond)
		now := clock.Now()
		// Each tick's heartbeat arrives whole (hello and auth came
		// before): LastHeard alone also moves when the reader starts
		// listening again after a frame, before the next one is in.
		frames := uint64(2 + i + 1)
		require.Eventually(t, func() bool {
			return r.LastHeard().Equal(now) && s.LastHeard().Equal(now) && r.Stats().FramesReceived >= frames
		}, 5*time.Second, time.Millisecond)
	}
	assert.NoError(t, r.Err())
	assert.NoError(t, s.Err())
	assert.GreaterOrEqual(t, r.Stats().FramesReceived, uint64(20+2))
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}

func TestSilentPeerTripsTimeout(t *testing.T) {
	t.Run("receiver detects a silent sender", func(t *testing.T) {
		sclock, rclock := newFakeClock(), newFakeClock() // the sender's never moves: it never beats
		scfg, rcfg := cfgs(sclock)
		rcfg.Clock = rclock
		failed := make(chan error, 1)
		rcfg.OnFailure = func(err error) { failed <- err }
		_, r := pipePair(t, scfg, rcfg)
		run := runReceiver(t, r)
		require.Eventually(t, r.listening.Load, 5*time.Second, time.Millisecond)
		step := r.detectEvery()
		rclock.Step(t, step, int(DefaultFailoverTimeout/step)-1)
		assert.NoError(t, r.Err(), "not before the timeout")
		rclock.Step(t, step, 2)
		err := waitErr(t, run)
		require.ErrorIs(t, err, ErrTimeout)
		assert.Contains(t, err.Error(), "nothing heard for")
		require.ErrorIs(t, <-failed, ErrTimeout)
	})
	t.Run("sender detects a silent receiver", func(t *testing.T) {
		sclock := newFakeClock()
		scfg, rcfg := cfgs(sclock)
		rcfg.Clock = newFakeClock()
		s, r := pipePair(t, scfg, rcfg)
		run := runReceiver(t, r) // reads, never beats
		require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 1, nil))
		require.NoError(t, s.WaitAck(t.Context(), 1))
		// The reader listens again after the ack before fake time moves
		// (else the count restarts and the steps fall short).
		require.Eventually(t, s.listening.Load, 5*time.Second, time.Millisecond)
		sclock.Step(t, s.detectEvery(), int(DefaultFailoverTimeout/s.detectEvery())+1)
		err := s.WaitAck(t.Context(), 2)
		require.ErrorIs(t, err, ErrTimeout)
		require.Error(t, waitErr(t, run))
	})
	t.Run("one late tick after a freeze is not the peer's silence", func(t *testing.T) {
		sclock, rclock := newFakeClock(), newFakeClock()
		scfg, rcfg := cfgs(sclock)
		rcfg.Clock = rclock
		_, r := pipePair(t, scfg, rcfg)
		run := runReceiver(t, r)
		require.Eventually(t, r.listening.Load, 5*time.Second, time.Millisecond)
		// Our own process was frozen for ten timeouts: the detector wakes
		// to one tick, as a real ticker does, and must not blame the peer.
		rclock.Step(t, 10*DefaultFailoverTimeout, 1)
		rclock.Step(t, r.detectEvery(), 3)
		assert.NoError(t, r.Err())
		r.Close()
		require.ErrorIs(t, waitErr(t, run), ErrClosed)
	})
}

// The sealer writes a checkpoint's Pages frames while the checkpoint
// goroutine fills the next ones: when a write fails (the connection was
// reset), the checkpoint goroutine's next call returns the stream's
// failure instead of waiting for a frame that will never go, and Close
// returns, its goroutines done.
func TestSealerFailureReachesTheCheckpointGoroutine(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	a, b := net.Pipe()
	sc := &resetOnWrite{Conn: a}
	s, serr, r, rerr := connect(t, sc, b, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	runReceiver(t, r)
	require.NoError(t, s.BeginCheckpoint(1, KindEpoch))
	sc.armed.Store(true)
	var err error
	for i := 0; err == nil && i < 20*MaxPagesPerFrame; i++ {
		err = s.SendPage(GPA(i%64)*PageSize, page(uint64(i)+1))
	}
	if err == nil {
		err = s.EndCheckpoint()
	}
	require.ErrorIs(t, err, ErrTruncated)
	require.ErrorIs(t, s.Err(), ErrTruncated)
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
}

// beginSink is a MemSink that says when each checkpoint begins.
type beginSink struct {
	*MemSink
	began chan uint64
}

func (s *beginSink) Begin(epoch uint64, kind Kind) error {
	s.began <- epoch
	return s.MemSink.Begin(epoch, kind)
}

// A Begin reaches the standby as BeginCheckpoint is called, before any
// page is sent: package replicate begins each checkpoint just before its
// pause, so that a standby idle since the last one wakes while the
// pause runs. The checkpoint then goes on as any other.
func TestBeginGoesOutAtOnce(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	sink := &beginSink{MemSink: NewMemSink(), began: make(chan uint64, 1)}
	rcfg.Sink = sink
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	for epoch := uint64(1); epoch <= 2; epoch++ {
		require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
		select {
		case got := <-sink.began:
			require.Equal(t, epoch, got)
		case <-time.After(10 * time.Second):
			t.Fatalf("checkpoint %d: the standby did not see its Begin before any page", epoch)
		}
		for i := range 3 {
			require.NoError(t, s.SendPage(GPA(i*PageSize), page(epoch*10+uint64(i))))
		}
		require.NoError(t, s.SendState([]byte("state")))
		require.NoError(t, s.EndCheckpoint())
		require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
	}
	assert.Equal(t, uint64(2), r.Committed())
	assert.Equal(t, page(22), sink.Page(2*PageSize))
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}
