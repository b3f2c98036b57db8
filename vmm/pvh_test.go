package vmm

import (
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/vmm/guestmem"
)

// testELFKernel is the smallest vmlinux ParseELFKernel accepts: an ELF64
// x86-64 header, a PT_LOAD holding code at physical 1 MiB (memory size
// bss bytes more), and a PT_NOTE with Xen's PHYS32_ENTRY note pointing at
// the code, its descriptor descSize bytes long (Linux writes 8).
func testELFKernel(code []byte, bss uint64, descSize int) []byte {
	const (
		phoff    = 64
		phentsz  = 56
		noteOff  = 0x100
		codeOff  = 0x1000
		codeAddr = 0x100000
	)
	le := binary.LittleEndian
	img := make([]byte, codeOff+len(code))
	copy(img, "\x7fELF")
	img[4], img[5], img[6] = 2, 1, 1 // ELFCLASS64, little-endian, version 1
	le.PutUint16(img[16:], 2)        // ET_EXEC
	le.PutUint16(img[18:], 62)       // EM_X86_64
	le.PutUint32(img[20:], 1)
	le.PutUint64(img[24:], codeAddr)
	le.PutUint64(img[32:], phoff)
	le.PutUint16(img[52:], 64)
	le.PutUint16(img[54:], phentsz)
	le.PutUint16(img[56:], 2)
	// An unrelated Xen note first, then the entry.
	note := func(b []byte, typ uint32, desc []byte) []byte {
		h := make([]byte, 16)
		le.PutUint32(h, 4)
		le.PutUint32(h[4:], uint32(len(desc)))
		le.PutUint32(h[8:], typ)
		copy(h[12:], "Xen\x00")
		b = append(b, h...)
		b = append(b, desc...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	entry := make([]byte, descSize)
	le.PutUint32(entry, codeAddr)
	notes := note(note(nil, 6, []byte("linux\x00")), xenElfNotePhys32Entry, entry)
	copy(img[noteOff:], notes)
	ph := func(i int, typ uint32, off, addr, filesz, memsz uint64) {
		p := img[phoff+i*phentsz:]
		le.PutUint32(p, typ)
		le.PutUint64(p[8:], off)
		le.PutUint64(p[16:], addr|0xffffffff80000000)
		le.PutUint64(p[24:], addr)
		le.PutUint64(p[32:], filesz)
		le.PutUint64(p[40:], memsz)
	}
	ph(0, 1, codeOff, codeAddr, uint64(len(code)), uint64(len(code))+bss) // PT_LOAD
	ph(1, 4, noteOff, 0, uint64(len(notes)), uint64(len(notes)))          // PT_NOTE
	copy(img[codeOff:], code)
	return img
}

func TestParseELFKernel(t *testing.T) {
	code := []byte{0xf4}
	for _, size := range []int{4, 8} {
		k, err := ParseELFKernel(testELFKernel(code, 0x3000, size))
		require.NoError(t, err, "descriptor of %d bytes", size)
		require.Equal(t, uint32(0x100000), k.Entry)
		require.Equal(t, []ELFSegment{{Addr: 0x100000, Data: code, MemSize: 0x3001}}, k.Segments)
		require.Equal(t, uint64(0x103001), k.End)
	}
	require.True(t, IsELF(testELFKernel(code, 0, 8)))
	require.False(t, IsELF(testKernel(code)))

	noNote := testELFKernel(code, 0, 8)
	binary.LittleEndian.PutUint32(noNote[0x100+16+8+8:], 17) // the entry note's type
	_, err := ParseELFKernel(noNote)
	require.True(t, errors.Is(err, ErrNoPVHNote), "got %v", err)

	truncated := testELFKernel(code, 0, 8)[:0x800] // the segment's bytes are missing
	_, err = ParseELFKernel(truncated)
	require.Error(t, err)

	i386 := testELFKernel(code, 0, 8)
	binary.LittleEndian.PutUint16(i386[18:], 3) // EM_386
	_, err = ParseELFKernel(i386)
	require.Error(t, err)
}

// The start info is struct hvm_start_info version 1 of Xen's
// arch-x86/hvm/start_info.h, field by field.
func TestHVMStartInfoLayout(t *testing.T) {
	e820 := E820Map(256 << 20)
	info, modlist, memmap, err := HVMStartInfo(cmdlineAddr, 0x0f000000, 0x123456, e820)
	require.NoError(t, err)
	le := binary.LittleEndian
	require.Len(t, info, 56)
	require.Equal(t, uint32(0x336ec578), le.Uint32(info[0:]), "magic")
	require.Equal(t, uint32(1), le.Uint32(info[4:]), "version")
	require.Equal(t, uint32(0), le.Uint32(info[8:]), "flags")
	require.Equal(t, uint32(1), le.Uint32(info[12:]), "nr_modules")
	require.Equal(t, uint64(pvhModlistAddr), le.Uint64(info[16:]), "modlist_paddr")
	require.Equal(t, uint64(cmdlineAddr), le.Uint64(info[24:]), "cmdline_paddr")
	require.Equal(t, uint64(0), le.Uint64(info[32:]), "rsdp_paddr")
	require.Equal(t, uint64(pvhMemmapAddr), le.Uint64(info[40:]), "memmap_paddr")
	require.Equal(t, uint32(len(e820)), le.Uint32(info[48:]), "memmap_entries")

	require.Len(t, modlist, 32)
	require.Equal(t, uint64(0x0f000000), le.Uint64(modlist[0:]), "module paddr")
	require.Equal(t, uint64(0x123456), le.Uint64(modlist[8:]), "module size")
	require.Equal(t, make([]byte, 16), modlist[16:], "no module command line")

	require.Len(t, memmap, 24*len(e820))
	for i, e := range e820 {
		require.Equal(t, e.Addr, le.Uint64(memmap[24*i:]))
		require.Equal(t, e.Size, le.Uint64(memmap[24*i+8:]))
		require.Equal(t, e.Type, le.Uint32(memmap[24*i+16:]))
	}
	// The three blobs fit their slots without overlapping.
	require.LessOrEqual(t, pvhStartInfoAddr+len(info), pvhModlistAddr)
	require.LessOrEqual(t, pvhModlistAddr+len(modlist), pvhMemmapAddr)
	require.LessOrEqual(t, pvhMemmapAddr+len(memmap), bootParamsAddr)

	info, modlist, _, err = HVMStartInfo(cmdlineAddr, 0, 0, e820)
	require.NoError(t, err)
	require.Nil(t, modlist)
	require.Equal(t, uint32(0), le.Uint32(info[12:]), "no initrd, no module")
	require.Equal(t, uint64(0), le.Uint64(info[16:]))
}

// On real KVM, the BSP enters a vmlinux at its PVH entry in 32-bit
// protected mode with EBX at a start info that names the command line and
// the initramfs. The code tells 32-bit from 64-bit mode by the byte 0x48:
// dec eax in 32-bit code, a REX prefix in 64-bit code.
func TestTinyPVHGuestBoots(t *testing.T) {
	kvmtest.Require(t)
	code := cat(
		[]byte{0xb8, 5, 0, 0, 0},                   // mov eax, 5
		[]byte{0x48, 0x90},                         // 32-bit: dec eax; nop. 64-bit: xchg rax, rax
		[]byte{0x89, 0xc1},                         // mov ecx, eax
		[]byte{0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33}, // cmp dword [ebx], 0x336ec578
		[]byte{0x75, 0x0a},                         // jne bad
		asmPrint("p\n"),
		[]byte{0x88, 0xc8}, // mov al, cl
		asmExitAL,
	)
	// bad: exit 99. Fix up the jne to skip print + mov al,cl + exit.
	skip := 2 + len(asmPrint("p\n")) + len(asmExitAL)
	code[9+6+1] = byte(skip)
	code = append(code, cat(asmMovAL(99), asmExitAL)...)

	out := &syncBuffer{}
	m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testELFKernel(code, 0x10000, 8),
		Initrd: []byte("not really "), InitrdAppend: []byte("an initramfs"), Cmdline: DefaultCmdline, Console: out})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	require.NoError(t, m.Start())
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, Result{Status: 4, Reason: "exit-port"}, res, "status 4: 32-bit mode and the magic at EBX")
	require.Equal(t, "p\n", out.String())

	info, err := m.Memory().Slice(pvhStartInfoAddr, hvmStartInfoSize)
	require.NoError(t, err)
	le := binary.LittleEndian
	cl, err := m.Memory().Slice(guestmem.GPA(le.Uint64(info[24:])), uint64(len(DefaultCmdline)+1))
	require.NoError(t, err)
	require.Equal(t, DefaultCmdline+"\x00", string(cl))
	mod, err := m.Memory().Slice(guestmem.GPA(le.Uint64(info[16:])), hvmModlistSize)
	require.NoError(t, err)
	initrd, err := m.Memory().Slice(guestmem.GPA(le.Uint64(mod[0:])), le.Uint64(mod[8:]))
	require.NoError(t, err)
	require.Equal(t, "not really an initramfs", string(initrd), "Initrd and InitrdAppend back to back, one module")
	require.Greater(t, le.Uint64(mod[0:]), uint64(0x100000+0x10000), "the initramfs lies above the kernel's bss")
}
