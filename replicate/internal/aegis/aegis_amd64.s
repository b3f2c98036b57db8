//go:build amd64 && !purego

#include "textflag.h"

// AEGIS-128L's bulk, RFC 10032 section 2, with the state S0 … S7 in
// X0 … X7 for a whole call. VAESENC key, state, dst is one AES round:
// dst = AESRound(state, key).

// LOAD and STORE move the state between *AX and X0 … X7.
#define LOAD \
	VMOVDQU 0(AX), X0 \
	VMOVDQU 16(AX), X1 \
	VMOVDQU 32(AX), X2 \
	VMOVDQU 48(AX), X3 \
	VMOVDQU 64(AX), X4 \
	VMOVDQU 80(AX), X5 \
	VMOVDQU 96(AX), X6 \
	VMOVDQU 112(AX), X7

#define STORE \
	VMOVDQU X0, 0(AX) \
	VMOVDQU X1, 16(AX) \
	VMOVDQU X2, 32(AX) \
	VMOVDQU X3, 48(AX) \
	VMOVDQU X4, 64(AX) \
	VMOVDQU X5, 80(AX) \
	VMOVDQU X6, 96(AX) \
	VMOVDQU X7, 112(AX)

// UPDATE is Update(M0 = X12, M1 = X13); it clobbers X8 and X9. The
// message goes in as the round key, AESRound(S7, S0 ^ M0) being
// AESRound(S7, M0) ^ S0 (the round ends by XORing its key), so that the
// XOR with S0 follows the round instead of preceding it: no block's
// dependence on its own previous value runs through more than one AES
// round, which shortens the chain from one Update to the next (five
// cycles to four where a round takes four; on this project's EPYC hosts
// the measured difference is within their noise, so the loop is bound
// elsewhere there, but it costs nothing). Each new block reads only
// old ones, so the order below overwrites a register only after its
// last reader.
#define UPDATE \
	VAESENC X12, X7, X8 \ // AESRound(S7, M0)
	VAESENC X13, X3, X9 \ // AESRound(S3, M1)
	VPXOR   X0, X8, X8  \ // S'0 = AESRound(S7, S0 ^ M0)
	VPXOR   X4, X9, X9  \ // S'4 = AESRound(S3, S4 ^ M1)
	VAESENC X7, X6, X7  \ // S'7 = AESRound(S6, S7)
	VAESENC X6, X5, X6  \ // S'6 = AESRound(S5, S6)
	VAESENC X5, X4, X5  \ // S'5 = AESRound(S4, S5)
	VAESENC X3, X2, X3  \ // S'3 = AESRound(S2, S3)
	VAESENC X2, X1, X2  \ // S'2 = AESRound(S1, S2)
	VAESENC X1, X0, X1  \ // S'1 = AESRound(S0, S1)
	VMOVDQA X8, X0      \
	VMOVDQA X9, X4

// KEYSTREAM is z0 = S6 ^ S1 ^ (S2 & S3) into X10 and
// z1 = S2 ^ S5 ^ (S6 & S7) into X11, two operations deep; it clobbers
// X14 and X15.
#define KEYSTREAM \
	VPAND X3, X2, X10  \
	VPXOR X6, X1, X14  \
	VPXOR X14, X10, X10 \
	VPAND X7, X6, X11  \
	VPXOR X5, X2, X15  \
	VPXOR X15, X11, X11

// DECRYPT is Dec of the ciphertext block C0 = X12, C1 = X13: it leaves
// the plaintext M0 = C0 ^ z0, M1 = C1 ^ z1 in X10 and X11 and updates
// the state with it. As in UPDATE the ciphertext goes in as the round
// key and the rest of S0 ^ M0 (S0 ^ z0) follows the round, so the
// keystream is not on the way from one Update to the next: Update
// would wait on C0 ^ z0 otherwise, nine cycles a block instead of five
// by the dependency chain alone.
#define DECRYPT \
	KEYSTREAM           \
	VAESENC X12, X7, X8 \ // AESRound(S7, C0)
	VAESENC X13, X3, X9 \ // AESRound(S3, C1)
	VPXOR   X0, X10, X14 \ // S0 ^ z0
	VPXOR   X4, X11, X15 \ // S4 ^ z1
	VPXOR   X14, X8, X8 \ // S'0 = AESRound(S7, S0 ^ C0 ^ z0)
	VPXOR   X15, X9, X9 \ // S'4 = AESRound(S3, S4 ^ C1 ^ z1)
	VPXOR   X12, X10, X10 \ // M0
	VPXOR   X13, X11, X11 \ // M1
	VAESENC X7, X6, X7  \
	VAESENC X6, X5, X6  \
	VAESENC X5, X4, X5  \
	VAESENC X3, X2, X3  \
	VAESENC X2, X1, X2  \
	VAESENC X1, X0, X1  \
	VMOVDQA X8, X0      \
	VMOVDQA X9, X4

// func absorb(s *state, b []byte)
TEXT ·absorb(SB), NOSPLIT, $0-32
	MOVQ s+0(FP), AX
	MOVQ b_base+8(FP), SI
	MOVQ b_len+16(FP), CX
	LOAD

absorbLoop:
	CMPQ CX, $32
	JB   absorbDone
	VMOVDQU (SI), X12
	VMOVDQU 16(SI), X13
	UPDATE
	ADDQ $32, SI
	SUBQ $32, CX
	JMP  absorbLoop

absorbDone:
	STORE
	VZEROUPPER
	RET

// func encBlocks(s *state, dst, src []byte)
TEXT ·encBlocks(SB), NOSPLIT, $0-56
	MOVQ s+0(FP), AX
	MOVQ dst_base+8(FP), DI
	MOVQ src_base+32(FP), SI
	MOVQ src_len+40(FP), CX
	LOAD

encLoop:
	CMPQ CX, $32
	JB   encDone
	VMOVDQU (SI), X12
	VMOVDQU 16(SI), X13
	KEYSTREAM
	VPXOR   X12, X10, X10
	VPXOR   X13, X11, X11
	VMOVDQU X10, (DI)
	VMOVDQU X11, 16(DI)
	UPDATE
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $32, CX
	JMP  encLoop

encDone:
	STORE
	VZEROUPPER
	RET

// func decBlocks(s *state, dst, src []byte)
TEXT ·decBlocks(SB), NOSPLIT, $0-56
	MOVQ s+0(FP), AX
	MOVQ dst_base+8(FP), DI
	MOVQ src_base+32(FP), SI
	MOVQ src_len+40(FP), CX
	LOAD

decLoop:
	CMPQ CX, $32
	JB   decDone
	VMOVDQU (SI), X12
	VMOVDQU 16(SI), X13
	DECRYPT
	VMOVDQU X10, (DI)
	VMOVDQU X11, 16(DI)
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $32, CX
	JMP  decLoop

decDone:
	STORE
	VZEROUPPER
	RET

// AEGIS-128X2's bulk: the same code on Y0 … Y15, each 256-bit register
// holding a block of both lanes (VAESENC on a Y register is one AES round
// in each 128-bit lane), the state laid out lane by lane (128 bytes per
// block pair: S0 of lane 0, S0 of lane 1, …), blocks of 64 bytes: M0 is
// the first 32 (lane 0's, then lane 1's), M1 the next 32.

// LOAD2 and STORE2 move the state between *AX and Y0 … Y7.
#define LOAD2 \
	VMOVDQU 0(AX), Y0 \
	VMOVDQU 32(AX), Y1 \
	VMOVDQU 64(AX), Y2 \
	VMOVDQU 96(AX), Y3 \
	VMOVDQU 128(AX), Y4 \
	VMOVDQU 160(AX), Y5 \
	VMOVDQU 192(AX), Y6 \
	VMOVDQU 224(AX), Y7

#define STORE2 \
	VMOVDQU Y0, 0(AX) \
	VMOVDQU Y1, 32(AX) \
	VMOVDQU Y2, 64(AX) \
	VMOVDQU Y3, 96(AX) \
	VMOVDQU Y4, 128(AX) \
	VMOVDQU Y5, 160(AX) \
	VMOVDQU Y6, 192(AX) \
	VMOVDQU Y7, 224(AX)

// UPDATE2, KEYSTREAM2 and DECRYPT2 are UPDATE, KEYSTREAM and DECRYPT
// on Y registers.
#define UPDATE2 \
	VAESENC Y12, Y7, Y8 \
	VAESENC Y13, Y3, Y9 \
	VPXOR   Y0, Y8, Y8 \
	VPXOR   Y4, Y9, Y9 \
	VAESENC Y7, Y6, Y7 \
	VAESENC Y6, Y5, Y6 \
	VAESENC Y5, Y4, Y5 \
	VAESENC Y3, Y2, Y3 \
	VAESENC Y2, Y1, Y2 \
	VAESENC Y1, Y0, Y1 \
	VMOVDQA Y8, Y0      \
	VMOVDQA Y9, Y4

#define KEYSTREAM2 \
	VPAND Y3, Y2, Y10  \
	VPXOR Y6, Y1, Y14  \
	VPXOR Y14, Y10, Y10 \
	VPAND Y7, Y6, Y11  \
	VPXOR Y5, Y2, Y15  \
	VPXOR Y15, Y11, Y11

#define DECRYPT2 \
	KEYSTREAM2           \
	VAESENC Y12, Y7, Y8 \
	VAESENC Y13, Y3, Y9 \
	VPXOR   Y0, Y10, Y14 \
	VPXOR   Y4, Y11, Y15 \
	VPXOR   Y14, Y8, Y8 \
	VPXOR   Y15, Y9, Y9 \
	VPXOR   Y12, Y10, Y10 \
	VPXOR   Y13, Y11, Y11 \
	VAESENC Y7, Y6, Y7  \
	VAESENC Y6, Y5, Y6  \
	VAESENC Y5, Y4, Y5  \
	VAESENC Y3, Y2, Y3  \
	VAESENC Y2, Y1, Y2  \
	VAESENC Y1, Y0, Y1  \
	VMOVDQA Y8, Y0      \
	VMOVDQA Y9, Y4

// func absorbX2(s *state, b []byte)
TEXT ·absorbX2(SB), NOSPLIT, $0-32
	MOVQ s+0(FP), AX
	MOVQ b_base+8(FP), SI
	MOVQ b_len+16(FP), CX
	LOAD2

absorbLoop2:
	CMPQ CX, $64
	JB   absorbDone2
	VMOVDQU (SI), Y12
	VMOVDQU 32(SI), Y13
	UPDATE2
	ADDQ $64, SI
	SUBQ $64, CX
	JMP  absorbLoop2

absorbDone2:
	STORE2
	VZEROUPPER
	RET

// func encBlocksX2(s *state, dst, src []byte)
TEXT ·encBlocksX2(SB), NOSPLIT, $0-56
	MOVQ s+0(FP), AX
	MOVQ dst_base+8(FP), DI
	MOVQ src_base+32(FP), SI
	MOVQ src_len+40(FP), CX
	LOAD2

encLoop2:
	CMPQ CX, $64
	JB   encDone2
	VMOVDQU (SI), Y12
	VMOVDQU 32(SI), Y13
	KEYSTREAM2
	VPXOR   Y12, Y10, Y10
	VPXOR   Y13, Y11, Y11
	VMOVDQU Y10, (DI)
	VMOVDQU Y11, 32(DI)
	UPDATE2
	ADDQ $64, SI
	ADDQ $64, DI
	SUBQ $64, CX
	JMP  encLoop2

encDone2:
	STORE2
	VZEROUPPER
	RET

// func decBlocksX2(s *state, dst, src []byte)
TEXT ·decBlocksX2(SB), NOSPLIT, $0-56
	MOVQ s+0(FP), AX
	MOVQ dst_base+8(FP), DI
	MOVQ src_base+32(FP), SI
	MOVQ src_len+40(FP), CX
	LOAD2

decLoop2:
	CMPQ CX, $64
	JB   decDone2
	VMOVDQU (SI), Y12
	VMOVDQU 32(SI), Y13
	DECRYPT2
	VMOVDQU Y10, (DI)
	VMOVDQU Y11, 32(DI)
	ADDQ $64, SI
	ADDQ $64, DI
	SUBQ $64, CX
	JMP  decLoop2

decDone2:
	STORE2
	VZEROUPPER
	RET

// func cpuid(leaf, sub uint32) (eax, ebx, ecx, edx uint32)
TEXT ·cpuid(SB), NOSPLIT, $0-24
	MOVL leaf+0(FP), AX
	MOVL sub+4(FP), CX
	CPUID
	MOVL AX, eax+8(FP)
	MOVL BX, ebx+12(FP)
	MOVL CX, ecx+16(FP)
	MOVL DX, edx+20(FP)
	RET
