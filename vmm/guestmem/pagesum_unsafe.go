//go:build amd64 && !purego

package guestmem

import (
	"unsafe"

	"golang.org/x/sys/cpu"
)

// pageSumVector: CopyPageSummed runs its vector loop here (the CPU has
// AVX2).
var pageSumVector = cpu.X86.HasAVX2

// copyPageSummedAVX2 (pagesum_amd64.s) copies PageSize bytes from src to
// dst and fills ps (its layout: U, then S, then NonZero as one byte).
//
//go:noescape
func copyPageSummedAVX2(dst, src *byte, ps *PageSum)

func copyPageSummedVector(dst, src []byte, ps *PageSum) {
	raceRead(src)
	raceWrite(dst)
	// Sound: ps is only described to the race detector as the bytes the
	// loop writes, never accessed through this view.
	raceWrite(unsafe.Slice((*byte)(unsafe.Pointer(ps)), unsafe.Sizeof(*ps)))
	// Sound: both slices hold PageSize bytes (CopyPageSummed cut them),
	// which is all the loop reads and writes, and ps is a whole PageSum.
	copyPageSummedAVX2(unsafe.SliceData(dst), unsafe.SliceData(src), ps)
}
