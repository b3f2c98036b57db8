package vmm

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseBzImageRejectsBadFiles(t *testing.T) {
	good := testKernel([]byte{0xf4})
	_, err := ParseBzImage(good)
	require.NoError(t, err)

	for name, mutate := range map[string]func([]byte) []byte{
		"short":        func(b []byte) []byte { return b[:0x100] },
		"no magic":     func(b []byte) []byte { copy(b[hdrMagic:], "ELF!"); return b },
		"bad bootflag": func(b []byte) []byte { b[hdrBootFlag] = 0; return b },
		"old protocol": func(b []byte) []byte { binary.LittleEndian.PutUint16(b[hdrVersion:], 0x0204); return b },
		"zImage":       func(b []byte) []byte { b[hdrLoadFlags] = 0; return b },
		"no 64-bit":    func(b []byte) []byte { b[hdrXLoadFlags] = 0; return b },
		"setup covers": func(b []byte) []byte { b[hdrSetupSects] = 200; return b },
	} {
		t.Run(name, func(t *testing.T) {
			img := mutate(append([]byte(nil), good...))
			_, err := ParseBzImage(img)
			require.True(t, errors.Is(err, ErrNotBzImage), "got %v", err)
		})
	}
}

func TestE820Map(t *testing.T) {
	require.Equal(t, []E820Entry{
		{0, 0x9fc00, E820RAM},
		{0x9fc00, 0x100000 - 0x9fc00, E820Reserved},
		{0x100000, (256 << 20) - 0x100000, E820RAM},
	}, E820Map(256<<20))

	big := E820Map(4 << 30)
	require.Len(t, big, 4)
	require.Equal(t, E820Entry{0x100000, PCIHoleStart - 0x100000, E820RAM}, big[2])
	require.Equal(t, E820Entry{1 << 32, (4 << 30) - PCIHoleStart, E820RAM}, big[3])
	var ram uint64
	for _, e := range big {
		if e.Type == E820RAM {
			ram += e.Size
		}
	}
	require.Equal(t, uint64(4<<30)-(0x100000-0x9fc00), ram, "all RAM but the BIOS area is usable")

	require.Equal(t, []struct{ GPA, Size uint64 }{{0, PCIHoleStart}, {1 << 32, 1 << 30}}, RAMLayout(4<<30))
}

func TestBootParams(t *testing.T) {
	k, err := ParseBzImage(testKernel([]byte{0xf4}))
	require.NoError(t, err)
	e820 := E820Map(128 << 20)
	bp, err := BootParams(k, cmdlineAddr, 0x7000000, 0x123456, e820)
	require.NoError(t, err)
	le := binary.LittleEndian
	require.Equal(t, "HdrS", string(bp[hdrMagic:hdrMagic+4]), "setup header copied")
	require.Equal(t, uint16(0x020f), le.Uint16(bp[hdrVersion:]))
	require.Equal(t, uint8(0xff), bp[hdrTypeOfLoader])
	require.Equal(t, uint8(loadedHigh|canUseHeap), bp[hdrLoadFlags])
	require.Equal(t, uint32(cmdlineAddr), le.Uint32(bp[hdrCmdLinePtr:]))
	require.Equal(t, uint32(0x7000000), le.Uint32(bp[hdrRamdiskImage:]))
	require.Equal(t, uint32(0x123456), le.Uint32(bp[hdrRamdiskSize:]))
	require.Equal(t, uint16(0xffff), le.Uint16(bp[hdrVidMode:]))
	require.Equal(t, uint8(3), bp[bpE820Entries])
	for i, e := range e820 {
		off := bpE820Table + 20*i
		require.Equal(t, e.Addr, le.Uint64(bp[off:]))
		require.Equal(t, e.Size, le.Uint64(bp[off+8:]))
		require.Equal(t, e.Type, le.Uint32(bp[off+16:]))
	}
	_, err = BootParams(k, cmdlineAddr, 0, 0, make([]E820Entry, 129))
	require.Error(t, err)
}

func TestInitrdPlacement(t *testing.T) {
	k, err := ParseBzImage(testKernel([]byte{0xf4}))
	require.NoError(t, err)
	k.PrefAddress, k.InitSize = 16<<20, 40<<20

	addr, err := InitrdPlacement(k, 256<<20, 10<<20+5)
	require.NoError(t, err)
	require.Zero(t, addr&0xfff, "page aligned")
	require.LessOrEqual(t, addr+10<<20+5, uint64(256<<20))
	require.GreaterOrEqual(t, addr, uint64(56<<20), "clear of the decompressed kernel")

	_, err = InitrdPlacement(k, 64<<20, 30<<20)
	require.ErrorContains(t, err, "memory too small")
	_, err = InitrdPlacement(k, 32<<20, 64<<20)
	require.ErrorContains(t, err, "memory too small")

	// initrd_addr_max caps the placement.
	k.InitrdAddrMax = 128<<20 - 1
	addr, err = InitrdPlacement(k, 1<<30, 1<<20)
	require.NoError(t, err)
	require.Equal(t, uint64(127<<20), addr)
}

func TestMPTable(t *testing.T) {
	b, err := MPTable(ebdaStart, 3, []PCIIRQ{{Slot: 1, GSI: 16}, {Slot: 2, GSI: 17}})
	require.NoError(t, err)
	le := binary.LittleEndian
	require.Equal(t, "_MP_", string(b[0:4]))
	require.Equal(t, uint32(ebdaStart+16), le.Uint32(b[4:]))
	require.Zero(t, checksum(b[:16]), "floating pointer checksum")
	cfg := b[16:]
	require.Equal(t, "PCMP", string(cfg[0:4]))
	n := int(le.Uint16(cfg[4:]))
	require.Equal(t, len(cfg), n)
	require.Zero(t, checksum(cfg[:n]), "config table checksum")
	require.Equal(t, uint32(lapicAddr), le.Uint32(cfg[36:]))

	// Walk the entries.
	var cpus, bsp, ioapics, pciIntr, isaIntr, local int
	off := 44
	for i := 0; i < int(le.Uint16(cfg[34:])); i++ {
		switch cfg[off] {
		case mpEntryProcessor:
			require.Equal(t, uint8(cpus), cfg[off+1], "APIC IDs are 0..n-1")
			cpus++
			if cfg[off+3]&2 != 0 {
				bsp++
			}
			off += 20
			continue
		case mpEntryIOAPIC:
			ioapics++
			require.Equal(t, uint32(ioapicAddr), le.Uint32(cfg[off+4:]))
		case mpEntryIOIntr:
			if cfg[off+4] == mpBusPCI {
				pciIntr++
				require.Equal(t, uint8(pciIntr)<<2, cfg[off+5], "slot<<2 | INTA")
				require.Equal(t, uint8(15+pciIntr), cfg[off+7])
			} else {
				require.Equal(t, cfg[off+5], cfg[off+7], "ISA IRQ n on pin n")
				isaIntr++
			}
		case mpEntryLocalIntr:
			local++
		}
		off += 8
	}
	require.Equal(t, n, off)
	require.Equal(t, 3, cpus)
	require.Equal(t, 1, bsp)
	require.Equal(t, 1, ioapics)
	require.Equal(t, 16, isaIntr)
	require.Equal(t, 2, pciIntr)
	require.Equal(t, 2, local)

	_, err = MPTable(ebdaStart, 0, nil)
	require.Error(t, err)
	_, err = MPTable(ebdaStart, 200, nil)
	require.ErrorContains(t, err, "do not fit")
	_, err = MPTable(ebdaStart, 1, []PCIIRQ{{Slot: 1, GSI: 3}})
	require.Error(t, err)
	_, err = MPTable(ebdaStart, MaxCPUs, nil)
	require.NoError(t, err, "MaxCPUs must fit in the EBDA")
}
