//go:build amd64 && !purego

#include "textflag.h"

// One 32-byte chunk, already loaded into Y (X its low half), stored at
// off(DI) and added: Y4 |= chunk; Y0 += units 0-3 zero-extended to 64
// bits, Y1 += units 4-7; then Y2 += Y0, Y3 += Y1.
#define CHUNK(Y, X, off) \
	VMOVDQU Y, off(DI) \
	VPOR Y, Y4, Y4 \
	VPMOVZXDQ X, Y8 \
	VEXTRACTI128 $1, Y, X9 \
	VPMOVZXDQ X9, Y9 \
	VPADDQ Y8, Y0, Y0 \
	VPADDQ Y9, Y1, Y1 \
	VPADDQ Y0, Y2, Y2 \
	VPADDQ Y1, Y3, Y3

// func copyPageSummedAVX2(dst, src *byte, ps *PageSum)
//
// CopyPageSummed's loop (pagesum.go, sumPage): Y0/Y1 hold U (classes
// 0-3, 4-7), Y2/Y3 S, Y4 the OR of every chunk; four chunks a turn, each
// loaded once, then stored and summed from the register.
TEXT ·copyPageSummedAVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ ps+16(FP), BX
	VPXOR Y0, Y0, Y0
	VPXOR Y1, Y1, Y1
	VPXOR Y2, Y2, Y2
	VPXOR Y3, Y3, Y3
	VPXOR Y4, Y4, Y4
	MOVQ $32, CX // 4096 / 128

loop:
	VMOVDQU 0(SI), Y10
	VMOVDQU 32(SI), Y11
	VMOVDQU 64(SI), Y12
	VMOVDQU 96(SI), Y13
	CHUNK(Y10, X10, 0)
	CHUNK(Y11, X11, 32)
	CHUNK(Y12, X12, 64)
	CHUNK(Y13, X13, 96)
	ADDQ $128, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  loop

	VMOVDQU Y0, 0(BX)
	VMOVDQU Y1, 32(BX)
	VMOVDQU Y2, 64(BX)
	VMOVDQU Y3, 96(BX)
	VPTEST  Y4, Y4
	SETNE   AX
	MOVB    AL, 128(BX)
	VZEROUPPER
	RET
