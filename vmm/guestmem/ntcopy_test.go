package guestmem

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// copyNT copies exactly what copy does, for any length and alignment:
// whole 64-byte blocks into an aligned destination around the cache, the
// rest (and an unaligned destination) as usual; nothing past the end.
func TestCopyNTSameAsCopy(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	src := make([]byte, 3*PageSize+100)
	for i := range src {
		src[i] = byte(rng.Uint32())
	}
	for range 500 {
		n := rng.IntN(2*PageSize + 70)
		so, do := rng.IntN(80), rng.IntN(80)
		if rng.IntN(2) == 0 {
			do &^= 15 // aligned destinations often, to take the fast path
		}
		want := bytes.Repeat([]byte{0xa5}, n+do+64)
		got := bytes.Clone(want)
		copy(want[do:do+n], src[so:so+n])
		copyNT(got[do:do+n], src[so:so+n])
		require.Equal(t, want, got, "n=%d src+%d dst+%d", n, so, do)
	}
}

// WriteAtNT writes and marks dirty what WriteAt does.
func TestWriteAtNT(t *testing.T) {
	m := newTestMemory(t)
	r := m.Regions()[1]
	page := make([]byte, PageSize)
	for i := range page {
		page[i] = byte(i*13 + 1)
	}
	require.NoError(t, m.WriteAtNT(page, 0x100000+5*PageSize))
	require.NoError(t, m.WriteAtNT([]byte("hello, world"), 0x100000+9*PageSize+PageSize-5)) // pages 9 and 10, unaligned
	assert.Equal(t, 3, r.VMMDirtyCount())
	got := make([]byte, PageSize)
	require.NoError(t, m.ReadAt(got, 0x100000+5*PageSize))
	assert.Equal(t, page, got)
	buf := make([]byte, 12)
	require.NoError(t, m.ReadAt(buf, 0x100000+9*PageSize+PageSize-5))
	assert.Equal(t, "hello, world", string(buf))
	assert.ErrorIs(t, m.WriteAtNT(page, 0x100000+200*PageSize), ErrOutOfRange)
}

// An NTWriter writes what WriteAt does; its pages are marked only at
// Flush (every ntBatch writes, and at the end), and it holds the lock
// write protection waits for from its first write to each Flush.
func TestNTWriter(t *testing.T) {
	m := newTestMemory(t)
	r := m.Regions()[1]
	w := m.NTWriter()
	pages := make([][]byte, ntBatch+3)
	for i := range pages {
		pages[i] = bytes.Repeat([]byte{byte(i + 1)}, PageSize)
	}
	assert.True(t, m.writing.TryLock(), "no write yet: the lock is free")
	m.writing.Unlock()
	for i := range ntBatch - 1 {
		require.NoError(t, w.WriteAt(pages[i], 0x100000+GPA(i)*PageSize))
	}
	assert.Equal(t, 0, r.VMMDirtyCount(), "nothing marked before a Flush")
	assert.False(t, m.writing.TryLock(), "the lock is held between writes")
	require.NoError(t, w.WriteAt(pages[ntBatch-1], 0x100000+GPA(ntBatch-1)*PageSize))
	assert.Equal(t, ntBatch, r.VMMDirtyCount(), "the ntBatch-th write flushed")
	assert.True(t, m.writing.TryLock(), "and released the lock")
	m.writing.Unlock()
	for i := ntBatch; i < len(pages); i++ {
		require.NoError(t, w.WriteAt(pages[i], 0x100000+GPA(i)*PageSize))
	}
	require.NoError(t, w.WriteAt(pages[0], 0x100000+GPA(len(pages)-1)*PageSize), "the same page again: the last write wins")
	require.NoError(t, w.WriteAt([]byte("hello, world"), 0x100000+150*PageSize+PageSize-5)) // pages 150 and 151, unaligned
	assert.ErrorIs(t, w.WriteAt(pages[0], 0x100000+200*PageSize), ErrOutOfRange)
	w.Flush()
	w.Flush() // a second Flush does nothing
	assert.True(t, m.writing.TryLock(), "Flush released the lock")
	m.writing.Unlock()
	assert.Equal(t, len(pages)+2, r.VMMDirtyCount())
	got := make([]byte, PageSize)
	for i := range len(pages) - 1 {
		require.NoError(t, m.ReadAt(got, 0x100000+GPA(i)*PageSize))
		require.Equal(t, pages[i], got, "page %d", i)
	}
	require.NoError(t, m.ReadAt(got, 0x100000+GPA(len(pages)-1)*PageSize))
	assert.Equal(t, pages[0], got)
	buf := make([]byte, 12)
	require.NoError(t, m.ReadAt(buf, 0x100000+150*PageSize+PageSize-5))
	assert.Equal(t, "hello, world", string(buf))
}

// BenchmarkWriteAtNT is a standby's copy of a checkpoint into the
// replica's memory: 4,096 pages, each after a 16-byte entry header as in
// a Pages frame, into 256 MiB of guest memory, with WriteAt and with
// WriteAtNT and an NTWriter, at page numbers in three orders: scattered (no order),
// sparse (ascending, every 16th page: a harvest's order, which walks the
// dirty bitmap) and consecutive. The destination is mostly out of cache,
// as a replica's memory is.
func BenchmarkWriteAtNT(b *testing.B) {
	const n, pages = 4096, 65536
	m, err := New([]Spec{{GPA: 0, Size: pages * PageSize}})
	require.NoError(b, err)
	b.Cleanup(func() { m.Close() })
	require.NoError(b, m.Fill(0, pages*PageSize, func(p []byte) error { // fault it all in
		for i := range p {
			p[i] = 1
		}
		return nil
	}))
	src := make([]byte, n*(PageSize+16))
	for i := range src {
		src[i] = byte(i * 7)
	}
	for _, order := range []string{"scattered", "sparse", "consecutive"} {
		for _, how := range []string{"WriteAt", "WriteAtNT", "NTWriter"} {
			b.Run(order+"/"+how, func(b *testing.B) {
				b.SetBytes(n * PageSize)
				round := 0
				for b.Loop() {
					write, nw := m.WriteAt, (*NTWriter)(nil)
					switch how {
					case "WriteAtNT":
						write = m.WriteAtNT
					case "NTWriter":
						nw = m.NTWriter()
						write = nw.WriteAt
					}
					for p := range n {
						at := p + round*n
						switch order {
						case "scattered":
							at = p*7919 + round*104729
						case "sparse":
							at = p*16 + round
						}
						off := p*(PageSize+16) + 16
						if err := write(src[off:off+PageSize], GPA(at%pages)*PageSize); err != nil {
							b.Fatal(err)
						}
					}
					if nw != nil {
						nw.Flush()
					}
					round++
				}
			})
		}
	}
}
