//go:build amd64 && !purego

package aegis

import "golang.org/x/sys/cpu"

// The VEX-encoded AES round (VAESENC) needs AES-NI and AVX; on Y
// registers it needs VAES (CPUID leaf 7, ECX bit 9) and the OS saving
// them, which HasAVX2 includes. x/sys/cpu reports VAES only with
// AVX-512, so this package asks CPUID itself. A CPU that claims them
// must also compute an RFC test vector right (knownAnswer).
var (
	supported   = cpu.X86.HasAES && cpu.X86.HasAVX && knownAnswer(v128L)
	supportedX2 = supported && cpu.X86.HasAVX2 && hasVAES() && knownAnswer(v128X2)
)

func hasVAES() bool {
	if maxLeaf, _, _, _ := cpuid(0, 0); maxLeaf < 7 {
		return false
	}
	_, _, ecx, _ := cpuid(7, 0)
	return ecx&(1<<9) != 0
}

// cpuid is the CPUID instruction.
func cpuid(leaf, sub uint32) (eax, ebx, ecx, edx uint32)

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

// absorbX2, encBlocksX2 and decBlocksX2 are AEGIS-128X2's absorb,
// encBlocks and decBlocks, on 64-byte blocks.
//
//go:noescape
func absorbX2(s *state, b []byte)

//go:noescape
func encBlocksX2(s *state, dst, src []byte)

//go:noescape
func decBlocksX2(s *state, dst, src []byte)
