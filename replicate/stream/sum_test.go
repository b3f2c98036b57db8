package stream

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// sumOf is sum64 of sections of the given types and payloads.
func sumOf(types []container.Type, payloads ...[]byte) uint64 {
	c := newSum64()
	for i, p := range payloads {
		c.Section(types[i], p)
	}
	return c.Sum64()
}

// What docs/STREAM.md and sum64's comment promise: every single-bit flip
// and every change of one word is caught; so are sections cut, grown,
// split differently, reordered or retyped, and words swapped; and the one
// blind spot the comment names is real (so the comment stays true).
func TestSum64Catches(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	p := make([]byte, 4100) // not a multiple of 32: the padded tail counts too
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	pg := []container.Type{container.TypePages}
	base := sumOf(pg, p)
	require.Equal(t, base, sumOf(pg, bytes.Clone(p)), "deterministic")

	for bit := range len(p) * 8 {
		q := bytes.Clone(p)
		q[bit/8] ^= 1 << (bit % 8)
		if sumOf(pg, q) == base {
			t.Fatalf("flip of bit %d missed", bit)
		}
	}
	for range 2000 {
		q := bytes.Clone(p)
		w := rng.IntN(len(p)/8) * 8
		binary.LittleEndian.PutUint64(q[w:], binary.LittleEndian.Uint64(q[w:])+rng.Uint64()|1)
		assert.NotEqual(t, base, sumOf(pg, q), "word at %d changed", w)
	}
	for range 2000 { // random changes of two words anywhere
		q := bytes.Clone(p)
		q[rng.IntN(len(q))] ^= byte(rng.Uint32() | 1)
		q[rng.IntN(len(q))] ^= byte(rng.Uint32() | 1)
		if !bytes.Equal(p, q) {
			assert.NotEqual(t, base, sumOf(pg, q))
		}
	}

	swapped := bytes.Clone(p)
	copy(swapped[0:8], p[32:40])
	copy(swapped[32:40], p[0:8])
	assert.NotEqual(t, base, sumOf(pg, swapped), "two words of one lane swapped")

	two := []container.Type{container.TypePages, container.TypeState}
	assert.NotEqual(t, base, sumOf(pg, p[:len(p)-1]), "cut by a byte")
	assert.NotEqual(t, base, sumOf(pg, append(bytes.Clone(p), 0)), "grown by a zero byte")
	assert.NotEqual(t, base, sumOf(pg, append(bytes.Clone(p), make([]byte, 32)...)), "grown by a zero block")
	assert.NotEqual(t, base, sumOf([]container.Type{container.TypeState}, p), "retyped")
	assert.NotEqual(t, sumOf(two, p[:64], p[64:]), sumOf(two, p[:96], p[96:]), "split elsewhere")
	assert.NotEqual(t, sumOf(two, p[:64], p[64:128]), sumOf([]container.Type{container.TypeState, container.TypePages}, p[64:128], p[:64]), "sections reordered")
	assert.NotEqual(t, sumOf(two, p, nil), sumOf(pg, p), "an empty section more")

	// The blind spot: the top bit of two words of one lane flipped, an
	// even number of 32-byte blocks apart, moves the lane's sum by
	// 2 × 2^63 = 0 and its weighted sum by an even multiple of 2^63 = 0.
	q := bytes.Clone(p)
	q[7] ^= 0x80
	q[2*32+7] ^= 0x80
	assert.Equal(t, base, sumOf(pg, q), "the documented blind spot (if this fails, update sum64's comment)")
}

// BenchmarkSum64 is the checkpoint checksum's cost per byte, with the
// loop this process chose (sum64) and with each loop (scalar, avx2),
// beside CRC32C's (the container's, which versions 5–7 used).
func BenchmarkSum64(b *testing.B) {
	p := benchPages(256)
	b.Run("sum64", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for b.Loop() {
			c := newSum64()
			c.Section(container.TypePages, p)
			_ = c.Sum64()
		}
	})
	loops := map[string]blockFunc{"scalar": blocksScalar, "avx2": blocksVector}
	for _, name := range []string{"scalar", "avx2"} {
		if loops[name] == nil {
			continue
		}
		b.Run(name, func(b *testing.B) {
			var a, s [4]uint64
			b.SetBytes(int64(len(p)))
			for b.Loop() {
				loops[name](&a, &s, p)
			}
		})
	}
	b.Run("crc32c", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for b.Loop() {
			c := container.NewChecksum(container.MagicCheckpoint, checkpointVersion)
			c.Section(container.TypePages, p)
			_ = c.Sum32()
		}
	})
}

// SectionPieces sums a payload cut into pieces of any sizes (empty ones
// too) as Section sums it whole.
func TestSum64SectionPieces(t *testing.T) {
	payload := make([]byte, 3*PageSize+77)
	for i := range payload {
		payload[i] = byte(i*31 + i>>7)
	}
	for _, cuts := range [][]int{
		nil,
		{16},
		{4, 16, 16 + PageSize, 32 + PageSize, 32 + 2*PageSize},
		{1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233},
		{31, 31, 33, 64, 65, 100, 3 * PageSize},
	} {
		var pieces [][]byte
		at := 0
		for _, c := range cuts {
			pieces = append(pieces, payload[at:c])
			at = c
		}
		pieces = append(pieces, payload[at:])
		whole, cut := newSum64(), newSum64()
		whole.Section(container.TypePages, payload)
		cut.SectionPieces(container.TypePages, len(payload), pieces)
		require.Equal(t, whole.Sum64(), cut.Sum64(), "cuts %v", cuts)
	}
}

// SectionSummed gives SectionPieces' sum for sections laid out as a
// Pages section of references is (a count, entry headers, pages, zero
// pages' entries alone; or grouped, the headers first, padded to a
// block boundary, then the pages), after other sections, taking the pages from
// their PageSums (guestmem.CopyPageSummed) without reading them; pieces
// whose offsets or lengths are not multiples of 4, or a summed piece
// that is not a page, it refuses, adding nothing.
func TestSum64SectionSummed(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := range 300 {
		n := 1 + rng.IntN(40)
		meta := binary.LittleEndian.AppendUint32(nil, uint32(n))
		var pieces [][]byte
		var sums []*guestmem.PageSum
		run, size := 0, 4
		for i := range n {
			if rng.IntN(4) == 0 {
				meta = container.AppendEntryHeader(meta, uint64(i)*PageSize, container.EncZero, 0)
				size += container.EntryHeaderSize
				continue
			}
			meta = container.AppendEntryHeader(meta, uint64(i)*PageSize, container.EncRaw, PageSize)
			src, page, ps := make([]byte, PageSize), make([]byte, PageSize), new(guestmem.PageSum)
			for j := range src {
				src[j] = byte(rng.Uint32())
			}
			if rng.IntN(5) == 0 {
				clear(src[:rng.IntN(PageSize)])
			}
			guestmem.CopyPageSummed(page, src, ps)
			pieces = append(pieces, meta[run:], page)
			sums = append(sums, nil, ps)
			run = len(meta)
			size += container.EntryHeaderSize + PageSize
		}
		if run < len(meta) {
			pieces = append(pieces, meta[run:])
			sums = append(sums, nil)
		}
		if trial%2 == 1 {
			// Grouped, as a Sender lays out its sections of references:
			// the count, flags, headers and padding, read as whole
			// blocks (addBlocks), then the pages; and here whole blocks
			// after them too, to be read at a block boundary further in.
			head := binary.LittleEndian.AppendUint16(nil, uint16(n))
			head = binary.LittleEndian.AppendUint16(head, container.SectionGrouped)
			var pages [][]byte
			var psums []*guestmem.PageSum
			for i, p := range pieces {
				if sums[i] == nil {
					k := 0
					if i == 0 {
						k = 4
					}
					head = append(head, p[k:]...)
				} else {
					pages, psums = append(pages, p), append(psums, sums[i])
				}
			}
			head = append(head, make([]byte, container.GroupedDataOffset(n)-len(head))...)
			tail := make([]byte, 32*rng.IntN(4))
			for j := range tail {
				tail[j] = byte(rng.Uint32())
			}
			pieces = append(append([][]byte{head}, pages...), tail)
			sums = append(append([]*guestmem.PageSum{nil}, psums...), nil)
			size = len(head) + len(pages)*PageSize + len(tail)
		}
		want, got := newSum64(), newSum64()
		before := make([]byte, rng.IntN(100))
		want.Section(container.TypeState, before)
		got.Section(container.TypeState, before)
		want.SectionPieces(container.TypePages, size, pieces)
		require.True(t, got.SectionSummed(container.TypePages, size, pieces, sums), "trial %d", trial)
		require.Equal(t, want.Sum64(), got.Sum64(), "trial %d: %d entries", trial, n)
	}
	page, ps := make([]byte, PageSize), new(guestmem.PageSum)
	guestmem.CopyPageSummed(page, page, ps)
	c, fresh := newSum64(), newSum64()
	assert.False(t, c.SectionSummed(container.TypePages, 3+PageSize, [][]byte{{1, 2, 3}, page}, []*guestmem.PageSum{nil, ps}), "a page at offset 3")
	assert.False(t, c.SectionSummed(container.TypePages, 6, [][]byte{{1, 2, 3, 4, 5, 6}}, []*guestmem.PageSum{nil}), "6 bytes read")
	assert.False(t, c.SectionSummed(container.TypePages, 8, [][]byte{{1, 2, 3, 4}}, []*guestmem.PageSum{nil}), "a length that is not the pieces'")
	assert.False(t, c.SectionSummed(container.TypePages, 4+PageSize/2, [][]byte{{1, 2, 3, 4}, page[:PageSize/2]}, []*guestmem.PageSum{nil, ps}), "half a page with a page's sums")
	assert.Equal(t, fresh, c, "refusals add nothing")
}

// The vector loop gives the scalar loop's sums, whatever the length, the
// lanes it starts from and the alignment of the bytes: so each end may
// choose either (sumLoop) and a checkpoint's sum still matches.
func TestSum64VectorSame(t *testing.T) {
	if blocksVector == nil {
		t.Skip("this CPU or build has no vector loop (AVX2)")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, 1<<20+64)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	lengths := []int{0, 32, 64, 96, 128, 160, 224, 256, 288, PageSize, MaxPagesPerFrame * PageSize}
	for range 200 {
		lengths = append(lengths, rng.IntN(1<<20/32)*32)
	}
	for _, n := range lengths {
		off := rng.IntN(32)
		b := buf[off : off+n]
		var a, s [4]uint64
		for i := range a {
			a[i], s[i] = rng.Uint64(), rng.Uint64()
		}
		va, vs := a, s
		blocksScalar(&a, &s, b)
		blocksVector(&va, &vs, b)
		require.Equal(t, a, va, "a lanes, %d bytes at offset %d", n, off)
		require.Equal(t, s, vs, "s lanes, %d bytes at offset %d", n, off)
	}
	// All ones: every lane wraps mod 2^64 many times over.
	ones := bytes.Repeat([]byte{0xff}, 1<<16)
	var a, s, va, vs [4]uint64
	blocksScalar(&a, &s, ones)
	blocksVector(&va, &vs, ones)
	require.Equal(t, a, va)
	require.Equal(t, s, vs)
	require.Contains(t, []string{"avx2", "scalar"}, SumLoop())
	t.Logf("this process sums with the %s loop", SumLoop())
}
