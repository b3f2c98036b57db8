//go:build amd64 && !purego

#include "textflag.h"

// func blocksAVX2(a, s *[4]uint64, b []byte)
//
// sum64's loop (sum.go, blocksScalar) with the four lanes in one register:
// Y0 = a, Y1 = s; for each 32-byte block, Y0 += block, then Y1 += Y0.
// len(b) is a multiple of 32; four blocks a turn, then one at a time.
TEXT ·blocksAVX2(SB), NOSPLIT, $0-40
	MOVQ a+0(FP), AX
	MOVQ s+8(FP), BX
	MOVQ b_base+16(FP), SI
	MOVQ b_len+24(FP), CX
	VMOVDQU (AX), Y0
	VMOVDQU (BX), Y1
	CMPQ CX, $128
	JB   one

four:
	VPADDQ (SI), Y0, Y0
	VPADDQ Y0, Y1, Y1
	VPADDQ 32(SI), Y0, Y0
	VPADDQ Y0, Y1, Y1
	VPADDQ 64(SI), Y0, Y0
	VPADDQ Y0, Y1, Y1
	VPADDQ 96(SI), Y0, Y0
	VPADDQ Y0, Y1, Y1
	ADDQ $128, SI
	SUBQ $128, CX
	CMPQ CX, $128
	JAE  four

one:
	CMPQ CX, $32
	JB   done
	VPADDQ (SI), Y0, Y0
	VPADDQ Y0, Y1, Y1
	ADDQ $32, SI
	SUBQ $32, CX
	JMP  one

done:
	VMOVDQU Y0, (AX)
	VMOVDQU Y1, (BX)
	VZEROUPPER
	RET
