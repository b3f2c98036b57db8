//go:build amd64 && !purego

package stream

import "golang.org/x/sys/cpu"

// blocksVector is blocksScalar in AVX2, where the CPU has it; nil where
// it does not.
var blocksVector blockFunc

func init() {
	if cpu.X86.HasAVX2 {
		blocksVector = blocksAVX2
	}
}

// blocksAVX2 (sum_amd64.s) adds b, a multiple of 32 bytes long, to the
// lanes a and s: Y0 holds a's four lanes, Y1 s's; per block, Y0 += the
// block, then Y1 += Y0, four blocks per turn of the loop.
//
//go:noescape
func blocksAVX2(a, s *[4]uint64, b []byte)
