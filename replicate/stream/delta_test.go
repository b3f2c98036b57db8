package stream

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// deltaCfgs is cfgs with deltas on both ends.
func deltaCfgs() (Config, Config) {
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Deltas, rcfg.Deltas = true, true
	return scfg, rcfg
}

// deltaPairAfterOne is a sender and a receiver that agreed on deltas, the
// receiver running into a MemSink, with checkpoint 1 (sendCheckpoint's
// three pages) sent: the base that forged frames of checkpoint 2 build on.
func deltaPairAfterOne(t *testing.T) (*Sender, *Receiver, *MemSink, <-chan error) {
	t.Helper()
	s, r, sink, run := deltaPair(t, CompressNone)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("s")))
	return s, r, sink, run
}

// deltaPair is a sender and a running receiver that agreed on deltas,
// the sender compressing with comp, the receiver staging into a MemSink.
func deltaPair(t *testing.T, comp Compression) (*Sender, *Receiver, *MemSink, <-chan error) {
	t.Helper()
	scfg, rcfg := deltaCfgs()
	scfg.Compression = comp
	sink := NewMemSink()
	rcfg.Sink = sink
	s, r := pipePair(t, scfg, rcfg)
	return s, r, sink, runReceiver(t, r)
}

// refuseForgedPages forges body as a Pages frame of checkpoint 2 once 1 is
// acknowledged, and requires that the receiver fails with want and that
// nothing of checkpoint 2 commits or stays staged.
func refuseForgedPages(t *testing.T, body []byte, want error) *MemSink {
	t.Helper()
	s, r, sink, run := deltaPairAfterOne(t)
	require.NoError(t, s.WaitAck(t.Context(), 1))
	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	forge(t, s, framePages, body)
	err := waitErr(t, run)
	require.ErrorIs(t, err, want)
	t.Logf("receiver: %v", err)
	assert.Equal(t, uint64(1), r.Committed())
	assert.Equal(t, page(1001), sink.Page(PageSize))
	assert.Zero(t, sink.Staged())
	return sink
}

// forgeCountedPages sends a forged stored Pages frame of body as the
// sender would have sent it: summed (unless a keyed session's tags cover
// it) and counted, so that the checkpoint's End agrees with it.
func forgeCountedPages(t *testing.T, s *Sender, body []byte) {
	t.Helper()
	if s.summed(true) {
		s.sum.Section(container.TypePages, body[pagesHeader:])
	}
	s.cur.pages++
	forge(t, s, framePages, body)
}

// evolve is page i at epoch e of TestDeltaChainsAcrossEpochs: most pages
// change by a word per epoch (deltas), every fifth is rewritten whole,
// every seventh goes to zero and back.
func evolve(i int, e uint64) []byte {
	switch {
	case i%7 == 3 && e%2 == 0:
		return make([]byte, PageSize)
	case i%5 == 1:
		return page(e*1000 + uint64(i))
	}
	p := textPage(uint64(i))
	for k := uint64(1); k <= e; k++ {
		binary.LittleEndian.PutUint64(p[(k*64+uint64(i)*8)%PageSize:], k*0x1234567+uint64(i))
	}
	return p
}

// TestDeltaChainsAcrossEpochs: the same pages, changed a little each
// checkpoint, travel as chains of deltas (initial sync whole, then
// deltas on deltas), and the standby's memory equals the sender's at
// every commit, page by page.
func TestDeltaChainsAcrossEpochs(t *testing.T) {
	for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			scfg, rcfg := deltaCfgs()
			scfg.Compression = comp
			sink := NewMemSink()
			rcfg.Sink = sink
			var commits int
			rcfg.OnCommit = func(c *Checkpoint) error {
				commits++
				return nil
			}
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			const n = 300
			var raw, wire []uint64
			for e := uint64(1); e <= 6; e++ {
				kind := KindEpoch
				if e <= 2 {
					kind = KindInitialSync
				}
				before := s.Stats()
				require.NoError(t, s.BeginCheckpoint(e, kind))
				for i := range n {
					require.NoError(t, s.SendPage(GPA(i*PageSize), evolve(i, e)))
				}
				require.NoError(t, s.SendState([]byte("state")))
				require.NoError(t, s.EndCheckpoint())
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), e))
				for i := range n {
					require.Equal(t, evolve(i, e), sink.Page(GPA(i*PageSize)), "epoch %d page %d", e, i)
				}
				after := s.Stats()
				raw = append(raw, after.PageBytes-before.PageBytes)
				wire = append(wire, after.PageWireBytes-before.PageWireBytes)
				if e == 1 {
					assert.Zero(t, after.DeltaPages, "nothing shipped before: every page whole")
				}
			}
			st, rt := s.Stats(), r.Stats()
			assert.True(t, st.Deltas)
			assert.True(t, rt.Deltas)
			assert.Equal(t, st.DeltaPages, rt.DeltaPages)
			// From epoch 2, the pages that changed by a word (about 2/3 of them)
			// travel as deltas.
			assert.GreaterOrEqual(t, st.DeltaPages, uint64(5*n/2))
			if comp != CompressNone {
				// Epoch 1 shipped the same kinds of pages whole.
				assert.Less(t, wire[5], wire[0], "deltas shrink what travels: %v", wire)
			}
			t.Logf("section bytes %v, wire bytes %v", raw, wire)
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
			assert.Equal(t, 6, commits)
		})
	}
}

// TestDeltasNeedBothEnds: deltas are off unless both ends ask.
func TestDeltasNeedBothEnds(t *testing.T) {
	for _, tt := range []struct{ sender, receiver bool }{{true, false}, {false, true}} {
		t.Run(fmt.Sprintf("sender %v receiver %v", tt.sender, tt.receiver), func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			scfg.Deltas, rcfg.Deltas = tt.sender, tt.receiver
			sink := NewMemSink()
			rcfg.Sink = sink
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			for e := uint64(1); e <= 3; e++ {
				require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
				for i := range 20 {
					require.NoError(t, s.SendPage(GPA(i*PageSize), evolve(i, e)))
				}
				require.NoError(t, s.EndCheckpoint())
			}
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 3))
			for i := range 20 {
				require.Equal(t, evolve(i, 3), sink.Page(GPA(i*PageSize)))
			}
			assert.False(t, s.Stats().Deltas)
			assert.False(t, r.Stats().Deltas)
			assert.Zero(t, s.Stats().DeltaPages)
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

// TestFreshStandbyGetsWholePages: a new stream (re-protection after a
// standby was lost, a reconnect, a migration) starts with nothing
// shipped, so its first checkpoint carries whole pages even for pages
// the sender's previous stream shipped many times; a new standby ends
// up with the same memory.
func TestFreshStandbyGetsWholePages(t *testing.T) {
	send := func(s *Sender, e uint64) {
		require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
		for i := range 50 {
			require.NoError(t, s.SendPage(GPA(i*PageSize), evolve(i, e)))
		}
		require.NoError(t, s.EndCheckpoint())
	}
	scfg, rcfg := deltaCfgs()
	old := NewMemSink()
	rcfg.Sink = old
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	for e := uint64(1); e <= 4; e++ {
		send(s, e)
	}
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 4))
	require.Positive(t, s.Stats().DeltaPages)
	// The standby is lost; a new one, empty, is protected from epoch 5.
	require.NoError(t, r.Close())
	require.Error(t, waitErr(t, run))
	scfg, rcfg = deltaCfgs()
	fresh := NewMemSink()
	rcfg.Sink = fresh
	s2, r2 := pipePair(t, scfg, rcfg)
	run2 := runReceiver(t, r2)
	send(s2, 5)
	require.NoError(t, s2.WaitAck(ctxTimeout(t, 10*time.Second), 5))
	assert.Zero(t, s2.Stats().DeltaPages, "the first checkpoint to a new standby: whole pages")
	send(s2, 6)
	require.NoError(t, s2.WaitAck(ctxTimeout(t, 10*time.Second), 6))
	assert.Positive(t, s2.Stats().DeltaPages, "then deltas again")
	for i := range 50 {
		require.Equal(t, evolve(i, 6), fresh.Page(GPA(i*PageSize)), "page %d", i)
	}
	require.NoError(t, s2.Close())
	require.NoError(t, waitErr(t, run2))
}

// TestReceiverRefusesBadDeltas: a delta for a page never shipped on the
// stream, one whose result does not match its CRC (the wrong base), and a
// malformed one are refused, and nothing of the checkpoint commits.
func TestReceiverRefusesBadDeltas(t *testing.T) {
	xorEntry := func(gpa GPA, crc uint32, n int) []byte {
		data := binary.LittleEndian.AppendUint32(nil, crc)
		data = append(data, make([]byte, n)...)
		data[4+7] = 1
		return stored(appendPageEntry([]byte{1, 0, 0, 0}, gpa, container.EncXOR, data))
	}
	// page(1001) with its byte 7 flipped: what a delta onto the right
	// base gives.
	right := page(1001)
	right[7] ^= 1
	tests := []struct {
		name string
		body []byte
		want error
	}{
		{"delta for a page never shipped", xorEntry(40*PageSize, 0, PageSize), ErrProtocol},
		{"delta onto the wrong base", xorEntry(PageSize, crc32.Checksum(right, castagnoli)+1, PageSize), ErrChecksum},
		{"short delta", xorEntry(PageSize, 0, PageSize-1), ErrFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			refuseForgedPages(t, tt.body, tt.want)
		})
	}
	// The right delta, for contrast, commits.
	s, _, sink, run := deltaPairAfterOne(t)
	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	body := xorEntry(PageSize, crc32.Checksum(right, castagnoli), PageSize)
	forgeCountedPages(t, s, body)
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 2))
	assert.Equal(t, right, sink.Page(PageSize))
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}
