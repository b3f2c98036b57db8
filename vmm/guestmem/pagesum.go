package guestmem

import "encoding/binary"

// A PageSum is what a summing copy of a page (CopyPageSummed) learns of
// its bytes on the way, so that no one has to read them again to test or
// sum them: whether any byte is non-zero, and, for each class c = i mod
// 8 of the page's 4-byte little-endian units u_i (i = 0 … 1023), the
// units' sum U[c] and the sum of U[c]'s running value taken after each of
// the page's 128 32-byte chunks, S[c] (a Fletcher pair per class, mod
// 2^64). Any sum that is linear in the page's bytes and weighs them by
// position at a 4-byte grain follows from those sixteen numbers wherever
// the page lands: package stream computes a page's share of its End sum
// from them (sum64.addPage), at any offset of the page in its section.
type PageSum struct {
	U, S    [8]uint64
	NonZero bool
}

// PageSumFast says whether CopyPageSummed runs its vector loop here (the
// CPU has AVX2), where it costs no more than a plain copy. Where it does
// not, a caller that needs no PageSum copies plainly instead.
func PageSumFast() bool { return pageSumVector }

// pageChunks is the number of 32-byte chunks in a page.
const pageChunks = PageSize / 32

// CopyPageSummed copies a page, src to dst (PageSize bytes each), and
// fills ps from the bytes it copied: each byte is read once, and what is
// summed is what was stored, even if src changes meanwhile. Where
// PageSumFast(), it costs what copy(dst, src) does (an AVX2 loop whose
// adds hide behind the memory traffic: BenchmarkCopyPage); elsewhere a
// copy and a loop in Go.
func CopyPageSummed(dst, src []byte, ps *PageSum) {
	dst, src = dst[:PageSize], src[:PageSize]
	if pageSumVector {
		copyPageSummedVector(dst, src, ps)
		return
	}
	copy(dst, src)
	sumPage(dst, ps)
}

// sumPage fills ps from page (PageSize bytes): the definition of a
// PageSum in Go, for CPUs without the vector loop and for tests.
func sumPage(page []byte, ps *PageSum) {
	var u, s [8]uint64
	var or uint64
	for d := 0; d < pageChunks; d++ {
		chunk := page[32*d : 32*d+32]
		for c := range 8 {
			v := uint64(binary.LittleEndian.Uint32(chunk[4*c:]))
			or |= v
			u[c] += v
			s[c] += u[c]
		}
	}
	*ps = PageSum{U: u, S: s, NonZero: or != 0}
}
