//go:build amd64 && !purego

#include "textflag.h"

// func copyNTBlocks(dst, src *byte, n int)
//
// Copies n bytes (a multiple of 64, n > 0) from src to dst (16-byte
// aligned) with non-temporal stores, 64 bytes a turn. The stores are
// weakly ordered: ntFence orders them before what the caller does next.
TEXT ·copyNTBlocks(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $6, CX
loop:
	MOVOU 0(SI), X0
	MOVOU 16(SI), X1
	MOVOU 32(SI), X2
	MOVOU 48(SI), X3
	MOVNTO X0, 0(DI)
	MOVNTO X1, 16(DI)
	MOVNTO X2, 32(DI)
	MOVNTO X3, 48(DI)
	ADDQ $64, SI
	ADDQ $64, DI
	DECQ CX
	JNZ loop
	RET

// func ntFence()
//
// SFENCE: every non-temporal store before it is globally visible before
// any store after it.
TEXT ·ntFence(SB), NOSPLIT, $0-0
	SFENCE
	RET
