//go:build amd64 && !purego

package guestmem

import "unsafe"

// copyNTBlocks (ntcopy_amd64.s) copies n bytes, a multiple of 64 and
// more than 0, from src to dst, which is 16-byte aligned, with
// non-temporal stores (SSE2's MOVNTDQ, on every amd64 CPU), unfenced.
//
//go:noescape
func copyNTBlocks(dst, src *byte, n int)

// ntFence (ntcopy_amd64.s, SFENCE) makes the non-temporal stores before
// it visible before any store after it.
func ntFence()

// copyNTUnfenced is copy(dst, src) for bytes nobody reads soon: whole
// 64-byte blocks into a 16-byte-aligned dst go around the cache (no line
// is read in before it is overwritten, none is evicted for it), the rest
// is copied as usual. The stores are not fenced: the caller calls
// ntFence (or copyNT) before anything another goroutine may read the
// bytes by, or learn of them through (a dirty mark, a lock's release).
// The goroutine that copied reads them back in order without it.
func copyNTUnfenced(dst, src []byte) {
	n := min(len(dst), len(src))
	k := n &^ 63
	// The address is only tested for alignment, never made a pointer again.
	if k == 0 || uintptr(unsafe.Pointer(unsafe.SliceData(dst)))%16 != 0 {
		copy(dst, src)
		return
	}
	raceRead(src[:k])
	raceWrite(dst[:k])
	// Sound: both slices hold at least k bytes, and the pointers are
	// only read and written through for those k bytes.
	copyNTBlocks(unsafe.SliceData(dst), unsafe.SliceData(src), k)
	copy(dst[k:n], src[k:n])
}
