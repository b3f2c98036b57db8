package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Offsets in the bzImage setup header and struct boot_params
// (Documentation/arch/x86/boot.rst, arch/x86/include/uapi/asm/bootparam.h).
const (
	bpExtRamdiskImage = 0x0c0
	bpExtRamdiskSize  = 0x0c4
	bpExtCmdLinePtr   = 0x0c8
	bpE820Entries     = 0x1e8
	hdrStart          = 0x1f1 // the setup header starts here in both
	hdrSetupSects     = 0x1f1
	hdrVidMode        = 0x1fa
	hdrBootFlag       = 0x1fe
	hdrJump           = 0x200
	hdrMagic          = 0x202
	hdrVersion        = 0x206
	hdrTypeOfLoader   = 0x210
	hdrLoadFlags      = 0x211
	hdrRamdiskImage   = 0x218
	hdrRamdiskSize    = 0x21c
	hdrHeapEndPtr     = 0x224
	hdrCmdLinePtr     = 0x228
	hdrInitrdAddrMax  = 0x22c
	hdrKernelAlign    = 0x230
	hdrRelocatable    = 0x234
	hdrXLoadFlags     = 0x236
	hdrCmdlineSize    = 0x238
	hdrPrefAddress    = 0x258
	hdrInitSize       = 0x260
	bpE820Table       = 0x2d0
	bootParamsSize    = 4096
	e820MaxEntries    = 128

	loadedHigh   = 0x01 // loadflags: protected-mode code at 1 MiB
	canUseHeap   = 0x80
	xlfKernel64  = 0x01 // xloadflags: has the 64-bit entry point
	minProtocol  = 0x020c
	loaderTypeID = 0xff // "undefined" boot loader
)

// e820 entry types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Entry is one entry of the BIOS memory map handed to the kernel.
type E820Entry struct {
	Addr, Size uint64
	Type       uint32
}

// ErrNotBzImage is returned for a kernel file without a usable setup header.
var ErrNotBzImage = errors.New("not a bzImage")

// Kernel is a parsed bzImage.
type Kernel struct {
	Setup    []byte // the setup header region of the file (real-mode part)
	Payload  []byte // the protected-mode kernel, loaded at 1 MiB
	Protocol uint16 // boot protocol version, e.g. 0x020f
	InitSize uint64 // memory the kernel needs from its load address
	// InitrdAddrMax is the highest address the initrd may occupy.
	InitrdAddrMax uint64
	CmdlineSize   uint32 // longest command line, without the NUL
	PrefAddress   uint64 // where the kernel decompresses itself
}

// ParseBzImage checks the setup header of a bzImage (magic, protocol
// version, 64-bit entry point) and splits the file.
func ParseBzImage(img []byte) (*Kernel, error) {
	if len(img) < 0x300 {
		return nil, fmt.Errorf("%w: file too short (%d bytes)", ErrNotBzImage, len(img))
	}
	if string(img[hdrMagic:hdrMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("%w: no HdrS magic at %#x", ErrNotBzImage, hdrMagic)
	}
	if binary.LittleEndian.Uint16(img[hdrBootFlag:]) != 0xaa55 {
		return nil, fmt.Errorf("%w: bad boot flag", ErrNotBzImage)
	}
	k := &Kernel{Protocol: binary.LittleEndian.Uint16(img[hdrVersion:])}
	if k.Protocol < minProtocol {
		return nil, fmt.Errorf("%w: boot protocol %d.%02d is older than 2.12 (no 64-bit entry)",
			ErrNotBzImage, k.Protocol>>8, k.Protocol&0xff)
	}
	if img[hdrLoadFlags]&loadedHigh == 0 {
		return nil, fmt.Errorf("%w: not loaded high (zImage)", ErrNotBzImage)
	}
	if binary.LittleEndian.Uint16(img[hdrXLoadFlags:])&xlfKernel64 == 0 {
		return nil, fmt.Errorf("%w: kernel has no 64-bit entry point", ErrNotBzImage)
	}
	sects := int(img[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	setupLen := (sects + 1) * 512
	if setupLen >= len(img) {
		return nil, fmt.Errorf("%w: setup (%d bytes) covers the whole file", ErrNotBzImage, setupLen)
	}
	k.Setup = img[:setupLen]
	k.Payload = img[setupLen:]
	k.InitSize = uint64(binary.LittleEndian.Uint32(img[hdrInitSize:]))
	k.InitrdAddrMax = uint64(binary.LittleEndian.Uint32(img[hdrInitrdAddrMax:]))
	k.CmdlineSize = binary.LittleEndian.Uint32(img[hdrCmdlineSize:])
	k.PrefAddress = binary.LittleEndian.Uint64(img[hdrPrefAddress:])
	return k, nil
}

// E820Map is the memory map for a guest of memSize bytes: low RAM up to
// the EBDA, the BIOS area reserved, RAM from 1 MiB, and RAM above 4 GiB
// when the PCI hole splits it.
func E820Map(memSize uint64) []E820Entry {
	m := []E820Entry{
		{0, ebdaStart, E820RAM},
		{ebdaStart, highMemory - ebdaStart, E820Reserved},
		{highMemory, lowRAMEnd(memSize) - highMemory, E820RAM},
	}
	if memSize > PCIHoleStart {
		m = append(m, E820Entry{fourGiB, memSize - PCIHoleStart, E820RAM})
	}
	return m
}

// BootParams builds the zero page: the kernel's setup header with the
// loader's fields filled in, and the e820 map.
func BootParams(k *Kernel, cmdlineAddr uint64, initrdAddr, initrdSize uint64, e820 []E820Entry) ([]byte, error) {
	if len(e820) > e820MaxEntries {
		return nil, fmt.Errorf("e820 map has %d entries, at most %d fit", len(e820), e820MaxEntries)
	}
	bp := make([]byte, bootParamsSize)
	// The header runs from 0x1f1 to the end given by the jump's offset byte.
	hdrEnd := 0x202 + int(k.Setup[hdrJump+1])
	if hdrEnd > len(k.Setup) || hdrEnd > bootParamsSize {
		return nil, fmt.Errorf("%w: setup header end %#x out of range", ErrNotBzImage, hdrEnd)
	}
	copy(bp[hdrStart:hdrEnd], k.Setup[hdrStart:hdrEnd])
	le := binary.LittleEndian
	le.PutUint16(bp[hdrVidMode:], 0xffff) // "normal" text mode
	bp[hdrTypeOfLoader] = loaderTypeID
	bp[hdrLoadFlags] |= loadedHigh | canUseHeap
	le.PutUint16(bp[hdrHeapEndPtr:], 0xfe00)
	le.PutUint32(bp[hdrCmdLinePtr:], uint32(cmdlineAddr))
	le.PutUint32(bp[bpExtCmdLinePtr:], uint32(cmdlineAddr>>32))
	le.PutUint32(bp[hdrRamdiskImage:], uint32(initrdAddr))
	le.PutUint32(bp[bpExtRamdiskImage:], uint32(initrdAddr>>32))
	le.PutUint32(bp[hdrRamdiskSize:], uint32(initrdSize))
	le.PutUint32(bp[bpExtRamdiskSize:], uint32(initrdSize>>32))
	bp[bpE820Entries] = uint8(len(e820))
	for i, e := range e820 {
		off := bpE820Table + 20*i
		le.PutUint64(bp[off:], e.Addr)
		le.PutUint64(bp[off+8:], e.Size)
		le.PutUint32(bp[off+16:], e.Type)
	}
	return bp, nil
}

// InitrdPlacement picks where the initramfs goes: page-aligned at the top
// of low RAM, below the kernel's limit, and clear of the kernel's own
// working area. It fails when memory is too small for both.
func InitrdPlacement(k *Kernel, memSize, initrdSize uint64) (uint64, error) {
	top := lowRAMEnd(memSize)
	if k.InitrdAddrMax != 0 && k.InitrdAddrMax+1 < top {
		top = k.InitrdAddrMax + 1
	}
	// The kernel decompresses at its preferred address (or 1 MiB) and
	// needs InitSize bytes from there.
	kernelEnd := uint64(kernelStart) + uint64(len(k.Payload))
	if k.PrefAddress != 0 && k.PrefAddress+k.InitSize > kernelEnd {
		kernelEnd = k.PrefAddress + k.InitSize
	}
	if kernelStart+k.InitSize > kernelEnd {
		kernelEnd = kernelStart + k.InitSize
	}
	return placeInitrd(top, kernelEnd, memSize, initrdSize)
}

// placeInitrd puts initrdSize bytes page-aligned just below top and above
// kernelEnd, or says how much memory it would take.
func placeInitrd(top, kernelEnd, memSize, initrdSize uint64) (uint64, error) {
	if initrdSize > top {
		return 0, fmt.Errorf("memory too small: %d MiB cannot hold a %d MiB initramfs", memSize>>20, initrdSize>>20)
	}
	addr := (top - initrdSize) &^ 0xfff
	if addr < kernelEnd {
		need := (kernelEnd + initrdSize + (1 << 20) - 1) >> 20
		return 0, fmt.Errorf("memory too small: kernel and initramfs need more than %d MiB, have %d MiB", need, memSize>>20)
	}
	return addr, nil
}
