package stream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHandshake(t *testing.T) {
	tests := []struct {
		name     string
		insecure bool
		rcvID    Identity
	}{
		{"keyed, identity checked", false, testIdentity()},
		{"keyed, receiver accepts any vm", false, Identity{}},
		{"insecure loopback", true, testIdentity()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			rcfg.Identity = tt.rcvID
			if tt.insecure {
				scfg.Key, scfg.Insecure = nil, true
				rcfg.Key, rcfg.Insecure = nil, true
			}
			s, r := pipePair(t, scfg, rcfg)
			assert.Equal(t, testIdentity(), r.Peer())
			assert.Equal(t, tt.rcvID, s.Peer())
			assert.NoError(t, s.Err())
			assert.NoError(t, r.Err())
		})
	}
}

// witnessed is id as a primary that holds generation 7 at a witness
// announces it.
func witnessed(id Identity) Identity {
	id.Generation, id.Holder = 7, "primary host-a #0123456789abcdef"
	return id
}

// The sender's witness generation and holder name reach the receiver
// (whose standby claims the next generation from it); a receiver that
// expects a VM does not compare them.
func TestHandshakeCarriesGeneration(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Identity = witnessed(testIdentity())
	rcfg.Identity = testIdentity()
	s, r := pipePair(t, scfg, rcfg)
	assert.Equal(t, uint64(7), r.Peer().Generation)
	assert.Equal(t, "primary host-a #0123456789abcdef", r.Peer().Holder)
	assert.Equal(t, scfg.Identity, r.Peer())
	assert.NoError(t, s.Err())

	// A holder without a generation describes no witness: refused.
	bad := testIdentity()
	bad.Holder = "primary"
	require.ErrorIs(t, bad.Validate(), ErrFrame)
	bad.Generation, bad.Holder = 1, strings.Repeat("h", MaxHolderLen+1)
	require.ErrorIs(t, bad.Validate(), ErrFrame)
}

func TestHandshakeRefusals(t *testing.T) {
	otherKey := []byte("fedcba9876543210fedcba9876543210")
	bigger := testIdentity()
	bigger.Regions = []Region{{GPA: 0, Size: 8 << 20}}
	tests := []struct {
		name      string
		edit      func(s, r *Config)
		senderErr error
		rcvErr    error
		mention   string
	}{
		{"wrong key", func(s, r *Config) { s.Key = otherKey }, ErrAuth, ErrAuth, "proof"},
		{"receiver has the wrong key", func(s, r *Config) { r.Key = otherKey }, ErrAuth, ErrAuth, "proof"},
		{"no key to a keyed listener", func(s, r *Config) { s.Key, s.Insecure = nil, true }, ErrAuth, ErrAuth, "no key"},
		{"keyed sender to an unkeyed receiver", func(s, r *Config) { r.Key, r.Insecure = nil, true }, ErrAuth, ErrAuth, "key"},
		{"mismatched layout", func(s, r *Config) { r.Identity = bigger }, ErrMismatch, ErrMismatch, "memory layout [0x0+0x800000]"},
		{"mismatched name", func(s, r *Config) { r.Identity.Name = "vm1" }, ErrMismatch, ErrMismatch, `"vm1"`},
		{"missing device", func(s, r *Config) { r.Identity.Devices = r.Identity.Devices[:1] }, ErrMismatch, ErrMismatch,
			"device virtio-net0 on the peer is missing here"},
		{"other disk size", func(s, r *Config) {
			r.Identity.Devices = slices.Clone(r.Identity.Devices)
			r.Identity.Devices[2] = Device{ID: "virtio-blk0", Attrs: []Attr{{"kind", "virtio-blk"}, {"size", "2097152"}, {"ro", "false"}}}
		}, ErrMismatch, ErrMismatch, `device virtio-blk0: size "2097152" here, "1048576" on the peer`},
		{"verify fails for a reason of its own", func(s, r *Config) {
			r.Verify = func(Identity) error { return errors.New("tap0: device busy") }
		}, ErrRefused, ErrRefused, "tap0: device busy"},
		{"verify refuses", func(s, r *Config) {
			r.Verify = func(Identity) error { return fmt.Errorf("%w: no such MAC here", ErrMismatch) }
		}, ErrMismatch, ErrMismatch, "no such MAC here"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			tt.edit(&scfg, &rcfg)
			a, b := net.Pipe()
			s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
			assert.Nil(t, s)
			assert.Nil(t, r)
			require.ErrorIs(t, serr, tt.senderErr)
			require.ErrorIs(t, rerr, tt.rcvErr)
			var se *StreamError
			require.ErrorAs(t, rerr, &se)
			assert.Contains(t, rerr.Error(), tt.mention)
			t.Logf("sender: %v", serr)
			t.Logf("receiver: %v", rerr)
		})
	}
}

// TestVersionRefused: a peer of an older (1: HMAC-framed session) or newer
// version is refused at its hello with ErrVersion, which the handshake
// framing (unchanged since version 1) makes readable across versions.
func TestVersionRefused(t *testing.T) {
	for _, v := range []uint16{1, Version + 1} {
		t.Run(fmt.Sprintf("version %d", v), func(t *testing.T) {
			_, rcfg := cfgs(newFakeClock())
			a, b := net.Pipe()
			done := make(chan error, 1)
			go func() {
				_, err := NewReceiver(t.Context(), b, rcfg)
				done <- err
			}()
			h := hello{version: v, keyed: true, role: roleSender, id: testIdentity()}
			var ctr counters
			w := newFrameWriter(a, &ctr.bytesSent, &ctr.framesSent)
			require.NoError(t, w.write(frameHello, appendHello(nil, &h)))
			go func() {
				_ = w.flush()
				_, _ = io.Copy(io.Discard, a) // the receiver's error frame
			}()
			err := <-done
			require.ErrorIs(t, err, ErrVersion)
			assert.Contains(t, err.Error(), fmt.Sprintf("version %d", v))
			a.Close()
		})
	}
}

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
		commits = append(commits, c)
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
			_ = s.fw.write(framePages, appendPageEntry([]byte{1, 0, 0, 0}, 0, EncRaw, page(1)))
			_ = s.fw.bw.Flush()
			s.wmu.Unlock()
		}, "inside pages frame"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var n int
			cutAt := -1
			sc, rc := proxy(t, func(i int, f []byte) [][]byte {
				n = i
				if cutAt >= 0 && i >= cutAt {
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
				cutAt = n + 2
				require.NoError(t, s.flushPages())
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
	pages := func(gpa GPA, enc Encoding, data []byte) []byte {
		return appendPageEntry([]byte{1, 0, 0, 0}, gpa, enc, data)
	}
	tests := []struct {
		name  string
		begin bool
		typ   frameType
		body  []byte
		want  error
	}{
		{"page outside layout", true, framePages, pages(8<<20, EncRaw, page(1)), ErrOutOfRange},
		{"page in the gap between regions", true, framePages, pages(1<<31, EncZero, nil), ErrOutOfRange},
		{"page straddling a region end", true, framePages, pages(GPA(id.Regions[0].Size-PageSize/2), EncZero, nil), ErrOutOfRange},
		{"unaligned page", true, framePages, pages(8, EncRaw, page(1)), ErrOutOfRange},
		{"delta encoding (reserved)", true, framePages, pages(0, EncXORRLE, []byte{1, 2}), ErrFrame},
		{"short raw page", true, framePages, pages(0, EncRaw, make([]byte, 100)), ErrFrame},
		{"pages outside a checkpoint", false, framePages, pages(0, EncZero, nil), ErrProtocol},
		{"state outside a checkpoint", false, frameState, []byte("x"), ErrProtocol},
		{"nested begin", true, frameBegin, appendBegin(nil, 2, KindEpoch), ErrProtocol},
		{"epoch not increasing", false, frameBegin, appendBegin(nil, 1, KindEpoch), ErrProtocol},
		{"initial sync after an epoch", false, frameBegin, appendBegin(nil, 7, KindInitialSync), ErrProtocol},
		{"end of another epoch", true, frameEnd, appendEnd(nil, endInfo{epoch: 3}), ErrProtocol},
		{"end with wrong page count", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, pages: 1}), ErrChecksum},
		{"end with wrong crc", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, crc: 1}), ErrChecksum},
		{"end with huge state length", true, frameEnd, appendEnd(nil, endInfo{epoch: 2, stateLen: 1 << 40}), ErrTooLarge},
		{"ack from the sender", false, frameAck, make([]byte, 8), ErrProtocol},
		{"accept from the sender", false, frameAccept, nil, ErrProtocol},
		{"handover without a final checkpoint", false, frameHandover, nil, ErrProtocol},
		{"disk write outside a checkpoint", false, frameDisk, appendDisk(nil, 0, 0, 1, []byte{1}), ErrProtocol},
		{"disk write to a receiver without disks", true, frameDisk, appendDisk(nil, 0, 0, 1, []byte{1}), ErrProtocol},
		{"disk number beyond the cap", true, frameDisk, appendDisk(nil, MaxDisks, 0, 1, []byte{1}), ErrOutOfRange},
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
	fr := newFrameReader(bytes.NewReader(append(hdr[:], make([]byte, 100)...)), &ctr.bytesReceived, &ctr.framesReceived)
	_, err := fr.next()
	require.ErrorIs(t, err, ErrTooLarge)
	assert.Zero(t, cap(fr.buf), "nothing allocated for the payload")

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
	assert.Less(t, cap(r.fr.buf), MaxFramePayload)
}

func TestSenderRefusesBadCalls(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	s, _ := pipePair(t, scfg, rcfg)
	require.ErrorIs(t, s.SendPage(0, page(1)), ErrProtocol, "no checkpoint open")
	require.ErrorIs(t, s.EndCheckpoint(), ErrProtocol)
	require.ErrorIs(t, s.BeginCheckpoint(0, KindEpoch), ErrProtocol)
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
	for range 20 { // 2 s of fake time, well past the timeout
		clock.Advance(100 * time.Millisecond)
		now := clock.Now()
		require.Eventually(t, func() bool { return r.LastHeard().Equal(now) && s.LastHeard().Equal(now) },
			5*time.Second, time.Millisecond)
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

func TestListenDialTCP(t *testing.T) {
	_, err := Listen("0.0.0.0:0", Config{Insecure: true})
	require.ErrorIs(t, err, ErrInsecureListen)
	_, err = Listen("127.0.0.1:0", Config{})
	require.ErrorIs(t, err, ErrConfig, "no key and not insecure")

	scfg, rcfg := cfgs(nil)
	scfg.Clock, rcfg.Clock = nil, nil
	refused := make(chan error, 16)
	rcfg.OnRefused = func(err error) { refused <- err }
	ln, err := Listen("127.0.0.1:0", rcfg)
	require.NoError(t, err)
	defer ln.Close()

	type res struct {
		r   *Receiver
		err error
	}
	ch := make(chan res, 1)
	go func() {
		r, err := ln.Accept(t.Context())
		ch <- res{r, err}
	}()

	// Strangers do not end the wait, and one that says nothing holds up
	// nobody.
	silent, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer silent.Close()
	closed, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	closed.Close()
	require.ErrorIs(t, <-refused, ErrTruncated, "connect and close")
	garbage, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	_, _ = garbage.Write(bytes.Repeat([]byte("GET / HTTP/1.1\r\n"), 10))
	require.ErrorIs(t, <-refused, ErrTooLarge, "a garbled hello")
	garbage.Close()
	stranger := scfg
	stranger.Key = []byte("a stranger's key, long enough...")
	_, err = Dial(t.Context(), ln.Addr().String(), stranger)
	require.ErrorIs(t, err, ErrAuth)
	require.ErrorIs(t, <-refused, ErrAuth)

	s, err := Dial(t.Context(), ln.Addr().String(), scfg)
	require.NoError(t, err)
	got := <-ch
	require.NoError(t, got.err)
	assert.Equal(t, testIdentity(), got.r.Peer())

	// A second sender while the first is served is refused as busy.
	_, err = Dial(t.Context(), ln.Addr().String(), scfg)
	require.ErrorIs(t, err, ErrBusy)
	require.ErrorIs(t, <-refused, ErrBusy)

	run := runReceiver(t, got.r)
	require.NoError(t, sendCheckpoint(s, 1, KindFinal, 100, []byte("state")))
	require.NoError(t, s.WaitAck(t.Context(), 1))
	require.NoError(t, s.Handover())
	require.NoError(t, waitErr(t, run))
	assert.True(t, got.r.HandedOver())
	require.NoError(t, s.Close(), "idempotent")
	require.NoError(t, got.r.Close())
}

func TestCheckListenAddr(t *testing.T) {
	tests := []struct {
		addr    string
		haveKey bool
		wantErr error
	}{
		{"127.0.0.1:7000", false, nil},
		{"127.1.2.3:7000", false, nil},
		{"[::1]:7000", false, nil},
		{"localhost:7000", false, nil},
		{":7000", false, ErrInsecureListen},
		{"0.0.0.0:7000", false, ErrInsecureListen},
		{"[::]:7000", false, ErrInsecureListen},
		{"10.0.0.5:7000", false, ErrInsecureListen},
		{"standby.example:7000", false, ErrInsecureListen},
		{":7000", true, nil},
		{"10.0.0.5:7000", true, nil},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s key=%v", tt.addr, tt.haveKey), func(t *testing.T) {
			err := CheckListenAddr(tt.addr, tt.haveKey)
			if tt.wantErr == nil {
				require.NoError(t, err)
			} else {
				require.ErrorIs(t, err, tt.wantErr)
			}
		})
	}
	require.Error(t, CheckListenAddr("no-port", true))
}

func TestLoadKey(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		mode    os.FileMode
		want    string
		wantErr bool
	}{
		{"good", "0123456789abcdef0123456789abcdef", 0o600, "0123456789abcdef0123456789abcdef", false},
		{"trailing newline trimmed", "0123456789abcdef0123456789abcdef\n", 0o400, "0123456789abcdef0123456789abcdef", false},
		{"world readable", "0123456789abcdef0123456789abcdef", 0o644, "", true},
		{"group readable", "0123456789abcdef0123456789abcdef", 0o640, "", true},
		{"empty", "", 0o600, "", true},
		{"only a newline", "\n", 0o600, "", true},
		{"short", "0123456789", 0o600, "", true},
		{"too long", string(make([]byte, MaxKeyLen+1)), 0o600, "", true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, fmt.Sprint(i))
			require.NoError(t, os.WriteFile(p, []byte(tt.content), tt.mode))
			require.NoError(t, os.Chmod(p, tt.mode))
			k, err := LoadKey(p)
			if tt.wantErr {
				require.ErrorIs(t, err, ErrKey)
				t.Logf("%v", err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(k))
		})
	}
	_, err := LoadKey(filepath.Join(dir, "missing"))
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestStagingSink(t *testing.T) {
	mem := map[GPA][]byte{}
	dest := pageWriterFunc(func(p []byte, gpa GPA) error { mem[gpa] = bytes.Clone(p); return nil })
	s := &StagingSink{Dest: dest}

	// Initial sync: straight to memory, nothing resumable to protect yet.
	require.NoError(t, s.Begin(1, KindInitialSync))
	require.NoError(t, s.StagePage(0, page(1)))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())

	// An epoch is staged until commit, and an abort leaves memory alone.
	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(0, page(2)))
	require.NoError(t, s.StagePage(PageSize, nil))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())
	assert.Equal(t, page(2), mem[0])
	assert.Equal(t, make([]byte, PageSize), mem[PageSize])

	require.NoError(t, s.Begin(3, KindEpoch))
	require.NoError(t, s.StagePage(0, page(3)))
	s.Abort()
	assert.Equal(t, page(2), mem[0])
}

type pageWriterFunc func(p []byte, gpa GPA) error

func (f pageWriterFunc) WriteAt(p []byte, gpa GPA) error { return f(p, gpa) }

func TestConnectionResetIsTruncation(t *testing.T) {
	err := truncated("frame header", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)})
	require.ErrorIs(t, err, ErrTruncated)
	require.NotErrorIs(t, truncated("frame header", net.ErrClosed), ErrTruncated, "a local close is not the peer dying")
}

// resetOnWrite is a connection whose writes fail as a reset connection's
// do once armed: the peer's process died with our data unread.
type resetOnWrite struct {
	net.Conn
	armed atomic.Bool
}

func (c *resetOnWrite) Write(p []byte) (int, error) {
	if c.armed.Load() {
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.ECONNRESET)}
	}
	return c.Conn.Write(p)
}

// A standby whose ack hits a connection reset by the dying primary ends
// the stream as truncated, as if it had read the end first: that is what
// its failover decision acts on ("connection reset by peer" on the ack
// write once made a standby refuse to take over from a SIGKILLed primary).
func TestResetOnAckIsTruncation(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	a, b := net.Pipe()
	rc := &resetOnWrite{Conn: b}
	s, serr, r, rerr := connect(t, a, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	rc.armed.Store(true)
	done := runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("state")))
	err := waitErr(t, done)
	require.ErrorIs(t, err, ErrTruncated)
	require.ErrorContains(t, err, "send ack")
	require.Equal(t, uint64(1), r.Committed(), "the checkpoint committed before its ack")
}
