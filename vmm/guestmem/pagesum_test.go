package guestmem

import (
	"fmt"
	"math/rand"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCopyPageSummed checks CopyPageSummed (the vector loop where the
// CPU has it) against sumPage, the definition, and the copy itself, on
// pages that exercise its edges: zero, one byte set at either end, every
// bit set (the largest units), random.
func TestCopyPageSummed(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	pages := map[string][]byte{
		"zero":       make([]byte, PageSize),
		"first byte": make([]byte, PageSize),
		"last byte":  make([]byte, PageSize),
		"all ones":   make([]byte, PageSize),
	}
	pages["first byte"][0] = 1
	pages["last byte"][PageSize-1] = 0x80
	for i := range pages["all ones"] {
		pages["all ones"][i] = 0xff
	}
	for i := range 8 {
		p := make([]byte, PageSize)
		rng.Read(p)
		pages[fmt.Sprint("random ", i)] = p
	}
	t.Logf("vector loop: %v", PageSumFast())
	for name, src := range pages {
		dst := make([]byte, PageSize)
		for i := range dst {
			dst[i] = 0xa5 // overwritten whole
		}
		var got, want PageSum
		CopyPageSummed(dst, src, &got)
		sumPage(src, &want)
		require.Equal(t, src, dst, name)
		require.Equal(t, want, got, name)
		require.Equal(t, name != "zero", got.NonZero, name)
	}
	// The definition itself, by hand for one page: unit i = i+1.
	p := make([]byte, PageSize)
	for i := range PageSize / 4 {
		p[4*i] = byte(i + 1)
		p[4*i+1] = byte((i + 1) >> 8)
	}
	var ps PageSum
	CopyPageSummed(make([]byte, PageSize), p, &ps)
	for c := range 8 {
		var u, s uint64
		for d := range pageChunks {
			u += uint64(8*d + c + 1)
			s += u
		}
		require.Equal(t, u, ps.U[c], "U[%d]", c)
		require.Equal(t, s, ps.S[c], "S[%d]", c)
	}
}

// BenchmarkCopyPage: a page copied plainly (copy) against
// CopyPageSummed, over a buffer that stays in cache and one that does
// not (as a checkpoint's staging copy of 64k pages).
func BenchmarkCopyPage(b *testing.B) {
	for _, size := range []int{1 << 20, 256 << 20} {
		src := make([]byte, size)
		for i := range src {
			src[i] = byte(i*7 + i>>12)
		}
		dst := make([]byte, size)
		copy(dst, src)
		var ps PageSum
		for _, f := range []struct {
			name string
			copy func(dst, src []byte)
		}{
			{"copy", func(dst, src []byte) { copy(dst, src) }},
			{"summed", func(dst, src []byte) { CopyPageSummed(dst, src, &ps) }},
		} {
			b.Run(fmt.Sprintf("%dMiB/%s", size>>20, f.name), func(b *testing.B) {
				b.SetBytes(PageSize)
				off := 0
				for b.Loop() {
					f.copy(dst[off:off+PageSize], src[off:off+PageSize])
					if off += PageSize; off == size {
						off = 0
					}
				}
			})
		}
	}
}
