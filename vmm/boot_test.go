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
