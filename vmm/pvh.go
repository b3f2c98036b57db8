package vmm

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"

	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// PVH boot: the uncompressed kernel (vmlinux, an ELF file) is entered
// through the 32-bit entry point named by its XEN_ELFNOTE_PHYS32_ENTRY
// note, with paging off and EBX pointing at an hvm_start_info, as Xen's
// PVH ABI has it (xen/include/public/arch-x86/hvm/start_info.h; Linux
// implements it in arch/x86/platform/pvh/). Linux builds its boot_params
// from the start info (init_pvh_bootparams), so no setup header, no
// decompressor and no page tables are needed: the kernel runs at its link
// address at once.

// ErrNoPVHNote is returned for an ELF kernel that has no PVH entry point.
var ErrNoPVHNote = errors.New("ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")

// Constants of the PVH boot ABI.
const (
	xenElfNotePhys32Entry = 18         // XEN_ELFNOTE_PHYS32_ENTRY
	hvmStartMagic         = 0x336ec578 // XEN_HVM_START_MAGIC_VALUE
	hvmStartVersion       = 1          // version 1 carries the memory map

	hvmStartInfoSize = 56 // struct hvm_start_info
	hvmModlistSize   = 32 // struct hvm_modlist_entry
	hvmMemmapSize    = 24 // struct hvm_memmap_table_entry

	// pvhCmdlineMax is Linux's COMMAND_LINE_SIZE on x86: an ELF kernel
	// has no setup header to say it.
	pvhCmdlineMax = 2048
)

// Where the PVH boot structures go: in the page below the zero page, which
// a PVH boot does not use.
const (
	pvhStartInfoAddr = 0x6000
	pvhModlistAddr   = pvhStartInfoAddr + 0x40
	pvhMemmapAddr    = pvhStartInfoAddr + 0x80
	pvhMemmapMax     = (0x1000 - 0x80) / hvmMemmapSize
)

// ELFKernel is a parsed vmlinux: its loadable segments and PVH entry.
type ELFKernel struct {
	Segments []ELFSegment
	Entry    uint32 // the 32-bit PVH entry point (physical)
	End      uint64 // first physical address past every segment
}

// ELFSegment is one PT_LOAD segment: Data at physical address Addr,
// followed by MemSize-len(Data) zero bytes.
type ELFSegment struct {
	Addr    uint64
	Data    []byte
	MemSize uint64
}

// IsELF reports whether img starts with the ELF magic: the kernel is a
// vmlinux to boot through PVH rather than a bzImage.
func IsELF(img []byte) bool { return bytes.HasPrefix(img, []byte(elf.ELFMAG)) }

// CheckKernel says whether img is a kernel the machine can boot: a
// vmlinux with a PVH entry (ELF magic) or a bzImage.
func CheckKernel(img []byte) error {
	if IsELF(img) {
		_, err := ParseELFKernel(img)
		return err
	}
	_, err := ParseBzImage(img)
	return err
}

// ParseELFKernel reads a 64-bit x86 vmlinux: its PT_LOAD segments at their
// physical addresses and the PVH entry point from its notes.
func ParseELFKernel(img []byte) (*ELFKernel, error) {
	f, err := elf.NewFile(bytes.NewReader(img))
	if err != nil {
		return nil, fmt.Errorf("ELF kernel: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("ELF kernel: %v %v, want a 64-bit x86-64 kernel", f.Class, f.Machine)
	}
	k := &ELFKernel{}
	found := false
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if p.Filesz > p.Memsz || p.Off+p.Filesz > uint64(len(img)) || p.Off+p.Filesz < p.Off {
				return nil, fmt.Errorf("ELF kernel: segment at %#x: file size %d, memory size %d, offset %d out of range",
					p.Paddr, p.Filesz, p.Memsz, p.Off)
			}
			if p.Paddr+p.Memsz < p.Paddr {
				return nil, fmt.Errorf("ELF kernel: segment at %#x wraps", p.Paddr)
			}
			k.Segments = append(k.Segments, ELFSegment{Addr: p.Paddr, Data: img[p.Off : p.Off+p.Filesz], MemSize: p.Memsz})
			k.End = max(k.End, p.Paddr+p.Memsz)
		case elf.PT_NOTE:
			if p.Off+p.Filesz > uint64(len(img)) || p.Off+p.Filesz < p.Off {
				return nil, fmt.Errorf("ELF kernel: note segment out of range")
			}
			if e, ok := pvhEntry(img[p.Off : p.Off+p.Filesz]); ok {
				k.Entry, found = e, true
			}
		}
	}
	if len(k.Segments) == 0 {
		return nil, errors.New("ELF kernel: no loadable segment")
	}
	if !found {
		return nil, ErrNoPVHNote
	}
	return k, nil
}

// pvhEntry walks the ELF notes in b for Xen's PHYS32_ENTRY. Linux writes
// its descriptor as a pointer-sized value (8 bytes on x86-64), the ABI as
// 4: either is read.
func pvhEntry(b []byte) (uint32, bool) {
	le := binary.LittleEndian
	align4 := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(b) >= 12 {
		namesz, descsz, typ := uint64(le.Uint32(b)), uint64(le.Uint32(b[4:])), le.Uint32(b[8:])
		nameEnd := 12 + align4(namesz)
		descEnd := nameEnd + align4(descsz)
		if nameEnd > uint64(len(b)) || descEnd > uint64(len(b)) || nameEnd < namesz {
			return 0, false
		}
		name := string(bytes.TrimRight(b[12:12+namesz], "\x00"))
		desc := b[nameEnd : nameEnd+descsz]
		if name == "Xen" && typ == xenElfNotePhys32Entry && (descsz == 4 || descsz == 8) {
			return le.Uint32(desc), true
		}
		b = b[descEnd:]
	}
	return 0, false
}

// HVMStartInfo builds the hvm_start_info (version 1) for a PVH boot, with
// its module list (the initrd, if any) and memory map, as the three blobs
// to write at pvhStartInfoAddr, pvhModlistAddr and pvhMemmapAddr.
func HVMStartInfo(cmdlineAddr, initrdAddr, initrdSize uint64, e820 []E820Entry) (info, modlist, memmap []byte, err error) {
	if len(e820) > pvhMemmapMax {
		return nil, nil, nil, fmt.Errorf("memory map has %d entries, at most %d fit", len(e820), pvhMemmapMax)
	}
	le := binary.LittleEndian
	info = make([]byte, hvmStartInfoSize)
	le.PutUint32(info[0:], hvmStartMagic)
	le.PutUint32(info[4:], hvmStartVersion)
	if initrdSize > 0 {
		modlist = make([]byte, hvmModlistSize)
		le.PutUint64(modlist[0:], initrdAddr)
		le.PutUint64(modlist[8:], initrdSize)
		le.PutUint32(info[12:], 1) // nr_modules
		le.PutUint64(info[16:], pvhModlistAddr)
	}
	le.PutUint64(info[24:], cmdlineAddr)
	// rsdp_paddr (32) stays 0: there is no ACPI; Linux finds the MP table.
	memmap = make([]byte, hvmMemmapSize*len(e820))
	for i, e := range e820 {
		le.PutUint64(memmap[24*i:], e.Addr)
		le.PutUint64(memmap[24*i+8:], e.Size)
		le.PutUint32(memmap[24*i+16:], e.Type) // E820 types are the PVH memmap types
	}
	le.PutUint64(info[40:], pvhMemmapAddr)
	le.PutUint32(info[48:], uint32(len(e820)))
	return info, modlist, memmap, nil
}

// loadPVH writes a vmlinux's segments, the initramfs, the command line,
// the start info and the MP table, and returns the entry point.
func (m *Machine) loadPVH(k *ELFKernel) (uint32, error) {
	cmdline := m.cfg.Cmdline
	if len(cmdline) >= pvhCmdlineMax {
		return 0, fmt.Errorf("kernel command line is %d bytes, the kernel takes at most %d", len(cmdline), pvhCmdlineMax-1)
	}
	low := lowRAMEnd(m.cfg.MemSize)
	for _, s := range k.Segments {
		if s.Addr < highMemory || s.Addr+s.MemSize > low {
			return 0, fmt.Errorf("kernel segment [%#x, %#x) is outside RAM [1 MiB, %d MiB)", s.Addr, s.Addr+s.MemSize, low>>20)
		}
	}
	var initrdAddr uint64
	initrdSize := m.initrdSize()
	if initrdSize > 0 {
		var err error
		if initrdAddr, err = placeInitrd(low, k.End, m.cfg.MemSize, initrdSize); err != nil {
			return 0, err
		}
	}
	info, modlist, memmap, err := HVMStartInfo(cmdlineAddr, initrdAddr, initrdSize, E820Map(m.cfg.MemSize))
	if err != nil {
		return 0, err
	}
	mp, err := MPTable(ebdaStart, m.cfg.CPUs, m.pci.IRQs())
	if err != nil {
		return 0, err
	}
	type write struct {
		what string
		gpa  uint64
		data []byte
	}
	var writes []write
	for _, s := range k.Segments {
		// Guest RAM is fresh and zero: the bss part and a segment's
		// trailing zeros need no writing, and left alone they cost
		// neither a copy nor a page fault (an untrimmed vmlinux's last
		// segment is mostly bss and brk; guestimg's is trimmed already,
		// and this costs it nothing).
		writes = append(writes, write{"kernel segment", s.Addr, bytes.TrimRight(s.Data, "\x00")})
	}
	writes = append(writes,
		write{"initramfs", initrdAddr, m.cfg.Initrd},
		write{"initramfs's appended part", initrdAddr + uint64(len(m.cfg.Initrd)), m.cfg.InitrdAppend},
		write{"command line", cmdlineAddr, append([]byte(cmdline), 0)},
		write{"start info", pvhStartInfoAddr, info},
		write{"module list", pvhModlistAddr, modlist},
		write{"memory map", pvhMemmapAddr, memmap},
		write{"mp table", ebdaStart, mp},
		write{"gdt", gdtAddr, pvhGDT()},
	)
	for _, w := range writes {
		if len(w.data) == 0 {
			continue
		}
		if err := m.mem.WriteAt(w.data, guestmem.GPA(w.gpa)); err != nil {
			return 0, fmt.Errorf("load %s at %#x: %w", w.what, w.gpa, err)
		}
	}
	return k.Entry, nil
}

// pvhGDT is bootGDT with a 32-bit code segment at __BOOT_CS: the PVH
// entry runs in protected mode. Linux loads its own GDT at once; this one
// only backs the selectors the vCPU starts with.
func pvhGDT() []byte {
	g := bootGDT()
	binary.LittleEndian.PutUint64(g[bootCS:], gdtEntry(0xc09b, 0, 0xfffff)) // code: present, exec/read, 32-bit, 4 KiB granularity
	return g
}

// pvhBootState puts the BSP at the PVH entry point: 32-bit protected mode,
// paging off, flat 4 GiB segments, EBX pointing at the start info.
func (c *vcpu) pvhBootState(entry uint32) error {
	s, err := c.fd.Sregs()
	if err != nil {
		return fmt.Errorf("get sregs: %w", err)
	}
	flatSegments(&s, false)
	s.TR = kvmapi.Segment{Base: 0, Limit: 0x67, Selector: bootTR, Type: 0xb, Present: 1}
	s.CR0 = cr0PE | cr0ET
	s.CR3 = 0
	s.CR4 = 0
	s.EFER = 0
	if err := c.fd.SetSregs(s); err != nil {
		return fmt.Errorf("set protected-mode sregs: %w", err)
	}
	if err := c.fd.SetFPU(kvmapi.FPU{FCW: 0x37f, MXCSR: 0x1f80}); err != nil {
		return fmt.Errorf("set fpu: %w", err)
	}
	if err := c.fd.SetRegs(kvmapi.Regs{
		RIP:    uint64(entry),
		RBX:    pvhStartInfoAddr,
		RFLAGS: 2,
	}); err != nil {
		return fmt.Errorf("set regs: %w", err)
	}
	return nil
}
