package vmm

import "govmm/internal/tinyguest"

// Test shorthands over internal/tinyguest.
var (
	testKernel = tinyguest.Kernel
	asmExitAL  = tinyguest.ExitAL()
	asmMovAL   = tinyguest.MovAL
	asmPrint   = tinyguest.Print
	cat        = tinyguest.Cat
)
