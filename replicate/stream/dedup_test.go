package stream

import (
	"encoding/binary"
	"hash/crc32"
	"hash/maphash"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// TestCopiesOfShippedPages: pages whose bytes the stream already shipped
// travel as copies (version 8) — a file written again into other pages,
// in both regions of the layout; pages rewritten unchanged; a duplicate
// of a page shipped earlier in the same checkpoint — and the standby's
// memory equals the sender's at every commit, page by page, also where a
// copy's source changes later in the same checkpoint (the copy takes the
// source as shipped before it) or changed just before it (no copy of
// the stale bytes).
func TestCopiesOfShippedPages(t *testing.T) {
	low, high := GPA(0), GPA(1<<32) // testIdentity's two regions
	at := func(base GPA, i int) GPA { return base + GPA(i*PageSize) }
	// Each checkpoint's writes in order; want is the number of copies.
	files := func(seed uint64) []byte { return textPage(seed) }
	steps := []struct {
		writes []pageWrite
		copies uint64
	}{
		// Epoch 1: "files" 0..9 in the low region, page 20 a duplicate of
		// file 3 within the checkpoint.
		{append(seq(low, 0, 10, files), pageWrite{at(low, 20), files(3)}), 1},
		// Epoch 2: the files again, into the high region (untar into
		// freed pages), and pages 0..4 rewritten unchanged.
		{append(seq(high, 0, 10, files), seq(low, 0, 5, files)...), 15},
		// Epoch 3: page 40 copies file 5 from high 5, then high 5 changes
		// (the copy took it as shipped before).
		{[]pageWrite{{at(low, 40), files(5)}, {at(high, 5), page(77)}}, 1},
		// Epoch 4: low 6 and high 6 both change first, then page 41 gets
		// file 6's old bytes: no copy of a stale source, a whole page.
		{[]pageWrite{{at(low, 6), page(78)}, {at(high, 6), page(79)}, {at(low, 41), files(6)}}, 0},
		// Epoch 5: page 42 gets page(79) (high 6's new bytes), page 43 a
		// zero page, then page(79) again at 44.
		{[]pageWrite{{at(low, 42), page(79)}, {at(low, 43), make([]byte, PageSize)}, {at(low, 44), page(79)}}, 2},
	}
	for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			s, r, sink, run := deltaPair(t, comp)
			mem := map[GPA][]byte{}
			for k, st := range steps {
				e := uint64(k + 1)
				before := s.Stats()
				require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
				for _, w := range st.writes {
					require.NoError(t, s.SendPage(w.gpa, w.data))
					mem[w.gpa] = w.data
				}
				require.NoError(t, s.EndCheckpoint())
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), e))
				requireSinkHolds(t, sink, mem, e)
				assert.Equal(t, st.copies, s.Stats().CopyPages-before.CopyPages, "epoch %d: copies", e)
			}
			st, rt := s.Stats(), r.Stats()
			assert.Equal(t, st.CopyPages, rt.CopyPages)
			assert.Equal(t, st.DeltaPages, rt.DeltaPages)
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

// pageWrite is a page sent at gpa.
type pageWrite struct {
	gpa  GPA
	data []byte
}

// seq writes data(i) at base+i pages for i in [from, to).
func seq(base GPA, from, to int, data func(uint64) []byte) []pageWrite {
	var out []pageWrite
	for i := from; i < to; i++ {
		out = append(out, pageWrite{base + GPA(i*PageSize), data(uint64(i))})
	}
	return out
}

// TestNoCopiesWithoutDeltas: without deltas nothing is shipped as a copy,
// and a copy entry on such a session is a malformed frame.
func TestNoCopiesWithoutDeltas(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	sink := NewMemSink()
	rcfg.Sink = sink
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	require.NoError(t, s.BeginCheckpoint(1, KindEpoch))
	for i := range 4 {
		require.NoError(t, s.SendPage(GPA(i*PageSize), textPage(1)))
	}
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1))
	assert.Zero(t, s.Stats().CopyPages)
	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	forge(t, s, framePages, stored(appendPageEntry([]byte{1, 0, 0, 0}, PageSize, container.EncCopy, copyData(0, 0))))
	require.ErrorIs(t, waitErr(t, run), ErrFrame)
	assert.Equal(t, uint64(1), r.Committed())
}

func copyData(crc uint32, src GPA) []byte {
	return binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint32(nil, crc), uint64(src))
}

// TestReceiverRefusesBadCopies: a copy of a page never shipped on the
// stream (itself included), of a page outside the layout, or whose result
// does not match its CRC (the standby holds other bytes there) is
// refused, and nothing of the checkpoint commits; the right copy commits.
func TestReceiverRefusesBadCopies(t *testing.T) {
	// Epoch 1 (sendCheckpoint) ships pages 0, 1 whole and 2 zero.
	src := page(1000)
	entry := func(gpa GPA, crc uint32, from GPA) []byte {
		return stored(appendPageEntry([]byte{1, 0, 0, 0}, gpa, container.EncCopy, copyData(crc, from)))
	}
	good := crc32.Checksum(src, castagnoli)
	tests := []struct {
		name string
		body []byte
		want error
	}{
		{"copy of a page never shipped", entry(PageSize, good, 40*PageSize), ErrProtocol},
		{"copy of itself, never shipped", entry(40*PageSize, good, 40*PageSize), ErrProtocol},
		{"copy from outside the layout", entry(PageSize, good, 1<<31), ErrOutOfRange},
		{"copy of other bytes", entry(5*PageSize, good+1, 0), ErrChecksum},
		{"copy of the zero page under the CRC of another", entry(5*PageSize, good, 2*PageSize), ErrChecksum},
		{"copy from an unaligned source", entry(PageSize, good, 0x801), ErrFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sink := refuseForgedPages(t, tt.body, tt.want)
			assert.Nil(t, sink.Page(5*PageSize))
		})
	}
	// The right copy, for contrast, commits.
	s, r, sink, run := deltaPairAfterOne(t)
	require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
	body := entry(5*PageSize, good, 0)
	forgeCountedPages(t, s, body)
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 2))
	assert.Equal(t, src, sink.Page(5*PageSize))
	assert.Equal(t, uint64(1), r.Stats().CopyPages)
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
}

// TestCopiesRandomWrites: checkpoints of random writes drawn from a small
// set of contents (so that most pages have a twin somewhere: copies of
// pages shipped in earlier checkpoints and earlier in the same one,
// sources overwritten before and after they are copied, zero pages,
// pages rewritten unchanged, pages changed by a word) over both regions
// leave the standby's memory equal to the sender's, page by page, at
// every commit.
func TestCopiesRandomWrites(t *testing.T) {
	id := testIdentity()
	var gpas []GPA
	for _, r := range id.Regions {
		for off := uint64(0); off < r.Size; off += PageSize {
			gpas = append(gpas, r.GPA+GPA(off))
		}
	}
	for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
		t.Run(comp.String(), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(comp), 13))
			s, r, sink, run := deltaPair(t, comp)
			mem := map[GPA][]byte{}
			contents := func() []byte {
				switch k := rng.IntN(20); {
				case k == 0:
					return make([]byte, PageSize)
				case k < 4:
					p := textPage(uint64(rng.IntN(8)))
					binary.LittleEndian.PutUint64(p[8*rng.IntN(PageSize/8):], rng.Uint64())
					return p
				default:
					return textPage(uint64(rng.IntN(40)))
				}
			}
			for e := uint64(1); e <= 12; e++ {
				require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
				for range 300 + rng.IntN(300) {
					gpa := gpas[rng.IntN(len(gpas))]
					var p []byte
					if old, ok := mem[gpa]; ok && rng.IntN(8) == 0 {
						p = old // rewritten unchanged
					} else if rng.IntN(8) == 0 && len(mem) > 0 {
						for _, v := range mem { // a twin of some page
							p = v
							break
						}
					} else {
						p = contents()
					}
					require.NoError(t, s.SendPage(gpa, p))
					mem[gpa] = p
				}
				require.NoError(t, s.EndCheckpoint())
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), e))
				requireSinkHolds(t, sink, mem, e)
			}
			st := s.Stats()
			t.Logf("%d pages: %d zero, %d deltas, %d copies", st.Pages, st.ZeroPages, st.DeltaPages, st.CopyPages)
			assert.Greater(t, st.CopyPages, st.Pages/2, "most pages have a twin")
			assert.Positive(t, st.DeltaPages)
			assert.Equal(t, st.CopyPages, r.Stats().CopyPages)
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

// TestCopyOnlyOfEqualBytes: the sender's index may name a page whose
// bytes differ (a hash collision, which cannot be made on purpose with
// a seeded 64-bit hash, is forged here): no copy is sent then, only a
// page whose bytes compare equal.
func TestCopyOnlyOfEqualBytes(t *testing.T) {
	sh := newShadow(testIdentity())
	var ps container.PageSection
	var xor [PageSize]byte
	a, b := textPage(1), textPage(2)
	require.Equal(t, container.EncRaw, sh.encode(&ps, 0, a, xor[:]))
	// Forge: b's hash names page 0, which holds a.
	_, i, _ := sh.page(0)
	sh.byHash[maphash.Bytes(sh.seed, b)] = uint32(i)
	require.Equal(t, container.EncRaw, sh.encode(&ps, 2*PageSize, b, xor[:]), "no copy of other bytes")
	require.Equal(t, container.EncCopy, sh.encode(&ps, 3*PageSize, b, xor[:]), "b itself, now shipped at page 2")
	require.Equal(t, container.EncCopy, sh.encode(&ps, 4*PageSize, a, xor[:]))
	pages, err := container.ParsePagesDeltas(ps.Payload(), nil)
	require.NoError(t, err)
	require.Len(t, pages, 4)
	assert.Equal(t, uint64(2*PageSize), binary.LittleEndian.Uint64(pages[2].Data[4:]), "the copy names page 2")
	assert.Equal(t, uint64(0), binary.LittleEndian.Uint64(pages[3].Data[4:]), "the copy names page 0")
}

// requireSinkHolds requires that sink holds mem after checkpoint e, a page
// it never received reading as zeros.
func requireSinkHolds(t *testing.T, sink *MemSink, mem map[GPA][]byte, e uint64) {
	t.Helper()
	for gpa, want := range mem {
		got := sink.Page(gpa)
		if got == nil {
			got = make([]byte, PageSize)
		}
		require.Equal(t, want, got, "epoch %d page %#x", e, uint64(gpa))
	}
}
