package stream

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// SendStablePage in an unkeyed, stored session writes its Pages frames
// from where the pages lie, as grouped sections: the standby's memory is
// that of the same checkpoints sent with SendPage, and the bytes on the
// wire those plus each section's padding, over TCP (writev) and over a
// pipe, zero pages among them; with
// the two calls mixed (frames cut at each switch too) memory is the
// checkpoint's all the same. Keyed, the frames are sealed in parts
// (sealedParts): the same sections, and a tag more for each run of
// pages between zero pages. SendSummedPage, whose End sum comes from the
// pages' PageSums where a whole frame has them, gives the same sum,
// bytes and memory alone, and mixed with the other two (frames with and
// without sums) the standby acks (its sum agrees) and holds the
// checkpoint. Pages staged back to back, as replicate stages them
// ("staged"), give the same bytes and memory again, and keyed, are
// sealed from where they lie: none is gathered.
func TestSendStablePage(t *testing.T) {
	for _, tt := range []struct {
		name       string
		keyed, tcp bool
	}{
		{"unkeyed tcp", false, true},
		{"unkeyed pipe", false, false},
		{"keyed tcp", true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const n = 700
			modes := []string{"copy", "stable", "mixed", "summed", "summed mixed", "staged"}
			sums := make([]uint64, len(modes))
			wire := make([]uint64, len(modes))
			for i, mode := range modes {
				scfg, rcfg := cfgs(newFakeClock())
				if !tt.keyed {
					scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
				}
				mem := &flatMem{b: make([]byte, 4<<20)}
				rcfg.Sink = &StagingSink{Dest: mem}
				var s *Sender
				var r *Receiver
				if tt.tcp {
					a, b := tcpPair(t)
					var serr, rerr error
					s, serr, r, rerr = connect(t, a, b, scfg, rcfg)
					require.NoError(t, serr)
					require.NoError(t, rerr)
				} else {
					s, r = pipePair(t, scfg, rcfg)
				}
				run := runReceiver(t, r)
				want := make([]byte, 4<<20)
				for epoch := uint64(1); epoch <= 2; epoch++ {
					staging := make([]byte, n*PageSize)
					require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
					for p := range n {
						pg := page(epoch*1000 + uint64(p))
						if p%5 == 3 || (p >= 256 && p < 300) || p >= 512 {
							// Zero pages: a run of them across a frame's
							// start, and a frame of zero pages alone.
							pg = make([]byte, PageSize)
						}
						copy(want[p*PageSize:], pg)
						send := s.SendPage
						if mode == "stable" || (mode == "mixed" && (p/100)%2 == 0) { // mixed: switching inside frames
							send = s.SendStablePage
						}
						if mode == "summed" || (mode == "summed mixed" && (p/100)%3 == 0) {
							staged, ps := make([]byte, PageSize), new(guestmem.PageSum)
							guestmem.CopyPageSummed(staged, pg, ps)
							pg = staged
							send = func(gpa GPA, page []byte) error { return s.SendSummedPage(gpa, page, ps) }
						} else if mode == "summed mixed" && (p/100)%3 == 1 {
							send = s.SendStablePage
						} else if mode == "staged" {
							staged, ps := staging[p*PageSize:(p+1)*PageSize], new(guestmem.PageSum)
							guestmem.CopyPageSummed(staged, pg, ps)
							pg = staged
							send = func(gpa GPA, page []byte) error { return s.SendSummedPage(gpa, page, ps) }
						}
						require.NoError(t, send(GPA(p*PageSize), pg))
					}
					require.NoError(t, s.SendState([]byte("state")))
					require.NoError(t, s.EndCheckpoint())
					require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
					rcfg.Sink.(*StagingSink).waitApplied()
					require.True(t, bytes.Equal(want, mem.b), "memory after checkpoint %d", epoch)
				}
				sums[i], wire[i] = s.cur.sum, s.Stats().BytesSent
				assert.Equal(t, uint64(2*n), r.Stats().Pages)
				if mode == "staged" {
					for k := range s.slots {
						assert.Zero(t, s.slots[k].gathered, "pages gathered: staged back to back, they are sealed where they lie")
					}
				}
				require.NoError(t, s.Close())
				require.NoError(t, waitErr(t, run))
			}
			// Mixed, frames are cut at each switch: their acks and
			// memory above are what holds. SendStablePage's frames are
			// grouped sections: the same entries, and zeros up to the
			// data's 64-byte boundary; keyed, sealed in parts, with a
			// tag for each run of pages between zero pages.
			pad, runs := 0, 0
			for first := 0; first < n; first += MaxPagesPerFrame {
				m := min(n-first, MaxPagesPerFrame)
				pad += container.GroupedDataOffset(m) - 4 - m*container.EntryHeaderSize
				for p := first; p < first+m; p++ {
					zero := func(p int) bool { return p%5 == 3 || (p >= 256 && p < 300) || p >= 512 }
					if !zero(p) && (p == first || zero(p-1)) {
						runs++
					}
				}
			}
			more := uint64(2 * pad)
			if tt.keyed {
				more += uint64(2 * runs * tagSize)
				// The End sum covers no stored section of a keyed session.
				assert.Equal(t, sums[0], sums[1], "the End frame's sum")
			} else {
				assert.NotEqual(t, sums[0], sums[1], "the End frame's sum: other bytes")
			}
			assert.Equal(t, wire[0]+more, wire[1], "bytes on the wire: the padding more, and keyed the parts' tags")
			assert.Equal(t, wire[1], wire[5], "bytes on the wire, staged")
			assert.Equal(t, sums[1], sums[5], "the End frame's sum, staged")
			// Summed, the sum comes from the pages' PageSums and the
			// headers' blocks, and must be the one taken by reading.
			assert.Equal(t, sums[1], sums[3], "the End frame's sum, summed")
			assert.Equal(t, wire[1], wire[3], "bytes on the wire, summed")
		})
	}
}

// The End sum of a frame of SendSummedPage's pages comes from their
// PageSums, but the receiver sums the bytes it reads: a PageSum that does
// not describe its page (here one byte of the page changed after its
// copy was summed) fails the checkpoint at its End, and nothing of it is
// committed or acknowledged.
func TestSendSummedPageWrongSum(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
	sink := NewMemSink()
	rcfg.Sink = sink
	s, r := tcpStreamPair(t, scfg, rcfg)
	run := runReceiver(t, r)
	if s.BeginCheckpoint(1, KindEpoch) == nil { // the calls may meet the receiver's verdict already
		for p := range 5 {
			staged, ps := make([]byte, PageSize), new(guestmem.PageSum)
			guestmem.CopyPageSummed(staged, page(uint64(p)+1), ps)
			if p == 3 {
				staged[PageSize-9] ^= 0x10
			}
			_ = s.SendSummedPage(GPA(p*PageSize), staged, ps)
		}
		if s.SendState([]byte("state")) == nil {
			_ = s.EndCheckpoint()
		}
	}
	require.ErrorIs(t, waitErr(t, run), ErrChecksum)
	assert.Zero(t, r.committed.Load(), "nothing committed")
	assert.Zero(t, s.Acked(), "nothing acknowledged")
}

// joinPiece joins a piece to the last where it lies right behind it in
// the same array (staged pages, one after the other), and only there: a
// piece elsewhere, one further on, or past the last piece's capacity
// stays a piece of its own.
func TestJoinPiece(t *testing.T) {
	staged := make([]byte, 5*PageSize)
	pg := func(i int) []byte { return staged[i*PageSize : (i+1)*PageSize] }
	meta := make([]byte, 64, 128)
	var iov [][]byte
	for _, p := range [][]byte{meta, pg(0), pg(1), pg(2), pg(4), pg(3)} {
		iov = joinPiece(iov, p)
	}
	require.Len(t, iov, 4, "meta, pages 0-2, page 4, page 3")
	assert.Len(t, iov[1], 3*PageSize)
	assert.Same(t, &staged[0], &iov[1][0])
	assert.Same(t, &staged[4*PageSize], &iov[2][0])
	assert.Same(t, &staged[3*PageSize], &iov[3][0])

	capped := staged[0:PageSize:PageSize] // its capacity ends where page 1 starts
	iov = joinPiece(joinPiece(nil, capped), pg(1))
	assert.Len(t, iov, 2, "a piece past the last one's capacity")
	iov = joinPiece(joinPiece(nil, meta[:32]), meta[32:64])
	assert.Equal(t, [][]byte{meta[:64]}, iov, "any array: what lies behind within capacity")
	assert.Len(t, joinPiece(joinPiece(nil, pg(0)), nil), 1, "an empty piece adds nothing to write")
}
