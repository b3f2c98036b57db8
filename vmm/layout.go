package vmm

// Guest-physical memory layout. Low addresses follow the PC conventions
// the Linux boot protocol expects; RAM above 3 GiB moves above 4 GiB so
// that [PCIHoleStart, 4 GiB) is free for PCI BARs, the IOAPIC and the
// local APIC.
const (
	gdtAddr        = 0x500  // boot GDT (four entries)
	bootParamsAddr = 0x7000 // the zero page: struct boot_params
	pml4Addr       = 0x9000 // identity page tables: PML4,
	pdptAddr       = 0xa000 // one PDPT,
	pdAddr         = 0xb000 // and four PDs of 2 MiB pages (0..4 GiB)
	cmdlineAddr    = 0x20000
	cmdlineMax     = 0x10000 // room reserved for the command line

	ebdaStart   = 0x9fc00 // MP table lives here (EBDA)
	biosStart   = 0xa0000 // VGA hole + BIOS area, reserved up to 1 MiB
	highMemory  = 0x100000
	kernelStart = highMemory // the protected-mode kernel is loaded at 1 MiB

	// PCIHoleStart is the bottom of the 32-bit MMIO window.
	PCIHoleStart = 0xc0000000
	// PCIMMIOEnd is where BAR assignment stops (the IOAPIC starts).
	PCIMMIOEnd   = 0xfec00000
	ioapicAddr   = 0xfec00000
	lapicAddr    = 0xfee00000
	fourGiB      = 1 << 32
	tssAddr      = 0xfffbd000 // three pages KVM needs for the TSS (Intel)
	identMapAddr = 0xfffbc000 // one page for the EPT identity map (Intel)
)

// RAMLayout returns the RAM regions for a guest of memSize bytes.
func RAMLayout(memSize uint64) []struct{ GPA, Size uint64 } {
	if memSize <= PCIHoleStart {
		return []struct{ GPA, Size uint64 }{{0, memSize}}
	}
	return []struct{ GPA, Size uint64 }{
		{0, PCIHoleStart},
		{fourGiB, memSize - PCIHoleStart},
	}
}

// lowRAMEnd is the end of the RAM below the PCI hole.
func lowRAMEnd(memSize uint64) uint64 {
	if memSize > PCIHoleStart {
		return PCIHoleStart
	}
	return memSize
}
