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

// UPDATE is Update(M0 = X12, M1 = X13); it clobbers X8, X12 and X13.
// Each new block reads only old ones, so the order below (S'0 into X8,
// then from S'7 down) overwrites a register only after its last reader.
#define UPDATE \
	VPXOR   X0, X12, X12 \ // S0 ^ M0
	VPXOR   X4, X13, X13 \ // S4 ^ M1
	VAESENC X12, X7, X8  \ // S'0 = AESRound(S7, S0 ^ M0)
	VAESENC X7, X6, X7   \ // S'7 = AESRound(S6, S7)
	VAESENC X6, X5, X6   \ // S'6 = AESRound(S5, S6)
	VAESENC X5, X4, X5   \ // S'5 = AESRound(S4, S5)
	VAESENC X13, X3, X4  \ // S'4 = AESRound(S3, S4 ^ M1)
	VAESENC X3, X2, X3   \ // S'3 = AESRound(S2, S3)
	VAESENC X2, X1, X2   \ // S'2 = AESRound(S1, S2)
	VAESENC X1, X0, X1   \ // S'1 = AESRound(S0, S1)
	VMOVDQA X8, X0

// KEYSTREAM is z0 = S6 ^ S1 ^ (S2 & S3) into X10 and
// z1 = S2 ^ S5 ^ (S6 & S7) into X11.
#define KEYSTREAM \
	VPAND X3, X2, X10 \
	VPXOR X6, X10, X10 \
	VPXOR X1, X10, X10 \
	VPAND X7, X6, X11 \
	VPXOR X2, X11, X11 \
	VPXOR X5, X11, X11

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
	KEYSTREAM
	VPXOR   X10, X12, X12
	VPXOR   X11, X13, X13
	VMOVDQU X12, (DI)
	VMOVDQU X13, 16(DI)
	UPDATE
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $32, CX
	JMP  decLoop

decDone:
	STORE
	VZEROUPPER
	RET
