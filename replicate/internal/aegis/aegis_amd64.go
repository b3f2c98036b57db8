//go:build amd64 && !purego

package aegis

import "golang.org/x/sys/cpu"

// The VEX-encoded AES round (VAESENC) needs AES-NI and AVX.
var supported = cpu.X86.HasAES && cpu.X86.HasAVX

// absorb runs Update on each 32-byte block of b (len(b) % 32 == 0).
//
//go:noescape
func absorb(s *state, b []byte)

// encBlocks is Enc on each 32-byte block of src into dst (len(src) % 32
// == 0, len(dst) >= len(src); dst may be src).
//
//go:noescape
func encBlocks(s *state, dst, src []byte)

// decBlocks is Dec on each 32-byte block of src into dst, as encBlocks.
//
//go:noescape
func decBlocks(s *state, dst, src []byte)
