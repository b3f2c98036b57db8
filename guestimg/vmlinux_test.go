package guestimg

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testSeg is one program header of a synthetic vmlinux.
type testSeg struct {
	typ         elf.ProgType
	paddr, mem  uint64
	data        []byte
	align, vOff uint64
}

// testVmlinux lays out a 64-bit ELF file as a linker does: each segment's
// bytes at a 2 MiB-aligned offset (no section headers).
func testVmlinux(segs []testSeg) []byte {
	const ehdr, phdr = 64, 56
	b := make([]byte, ehdr+phdr*len(segs))
	copy(b, elf.ELFMAG)
	b[4], b[5], b[6] = byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), 1
	le := binary.LittleEndian
	le.PutUint16(b[16:], uint16(elf.ET_EXEC))
	le.PutUint16(b[18:], uint16(elf.EM_X86_64))
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], ehdr)
	le.PutUint16(b[52:], ehdr)
	le.PutUint16(b[54:], phdr)
	le.PutUint16(b[56:], uint16(len(segs)))
	for i, s := range segs {
		off := uint64(len(b))
		if s.typ == elf.PT_LOAD {
			off = (off + 2<<20 - 1) &^ (2<<20 - 1)
		}
		b = append(b, make([]byte, off-uint64(len(b)))...)
		b = append(b, s.data...)
		h := b[ehdr+phdr*i:]
		le.PutUint32(h[0:], uint32(s.typ))
		le.PutUint64(h[8:], off)
		le.PutUint64(h[16:], s.paddr+s.vOff)
		le.PutUint64(h[24:], s.paddr)
		le.PutUint64(h[32:], uint64(len(s.data)))
		le.PutUint64(h[40:], s.mem)
		le.PutUint64(h[48:], s.align)
	}
	return b
}

// loadImage is what a loader puts in memory for f: each PT_LOAD's file
// bytes, then zeros to its memory size, and which bytes some PT_LOAD
// covers; and the notes' bytes.
func loadImage(t *testing.T, b []byte) (mem []byte, covered []bool, notes [][]byte) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(b))
	require.NoError(t, err)
	mem, covered = make([]byte, 4<<20), make([]bool, 4<<20)
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			require.LessOrEqual(t, p.Off+p.Filesz, uint64(len(b)))
			copy(mem[p.Paddr:], b[p.Off:p.Off+p.Filesz])
			for a := p.Paddr; a < p.Paddr+p.Memsz; a++ {
				assert.False(t, covered[a], "%#x loaded twice", a)
				covered[a] = true
			}
		case elf.PT_NOTE:
			notes = append(notes, b[p.Off:p.Off+p.Filesz])
		}
	}
	return mem, covered, notes
}

// Trimming changes the file, never what is loaded: the same bytes at the
// same addresses, the same memory covered, the same notes; zero pages and
// the linker's alignment gaps leave the file.
func TestTrimVmlinuxKeepsTheMemoryImage(t *testing.T) {
	t.Parallel()
	page := func(fill byte, n int) []byte { return bytes.Repeat([]byte{fill}, n) }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	note := cat([]byte{4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0}, []byte("Xen\x00"), []byte{0x40, 0x10, 0x10, 0, 0, 0, 0, 0})
	text := cat(page(0xcc, 100), note, page(0x90, 4096-100-len(note)), // page 0
		page(0, 3*4096),               // three zero pages: split
		page(0x11, 10), page(0, 4086), // a page with 10 bytes
		page(0, 4096),                     // one zero page: kept
		page(0x22, 4096), page(0, 2*4096)) // trailing zeros: memory-only
	data := cat(page(0, 2*4096), page(0x33, 4096), page(0, 4096), page(0x44, 100))
	segs := []testSeg{
		{typ: elf.PT_LOAD, paddr: 1 << 20, mem: uint64(len(text)) + 0x3000, data: text, align: 2 << 20, vOff: 0xffffffff80000000},
		{typ: elf.PT_LOAD, paddr: 2<<20 + 0x4000, mem: uint64(len(data)) + 0x10, data: data, align: 2 << 20, vOff: 0xffffffff80000000},
		{typ: elf.PT_LOAD, paddr: 3 << 20, mem: 0x4000, data: page(0, 0x2000), align: 2 << 20},
		{typ: elf.PT_NOTE, paddr: 1<<20 + 100, mem: uint64(len(note)), data: note, align: 4},
	}
	in := testVmlinux(segs)
	out, err := TrimVmlinux(in)
	require.NoError(t, err)

	wantMem, wantCov, wantNotes := loadImage(t, in)
	gotMem, gotCov, gotNotes := loadImage(t, out)
	assert.True(t, bytes.Equal(wantMem, gotMem), "memory image")
	assert.Equal(t, wantCov, gotCov, "memory covered")
	assert.Equal(t, wantNotes, gotNotes)

	f, err := elf.NewFile(bytes.NewReader(out))
	require.NoError(t, err)
	assert.Empty(t, f.Sections, "no section headers")
	var fileBytes uint64
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			assert.Zero(t, (p.Off-p.Vaddr)%4096, "offset %#x congruent to address %#x", p.Off, p.Vaddr)
			fileBytes += p.Filesz
		}
	}
	// Text: page 0, then pages 4-6 (the 10-byte page, the one zero page
	// kept, the 0x22 page); data: a page, the one zero page kept, 100
	// bytes.
	assert.Equal(t, uint64(4096+3*4096+2*4096+100), fileBytes)
	assert.Less(t, len(out), 12*4096, "packed: %d bytes from %d", len(out), len(in))
}

func TestNonZeroRuns(t *testing.T) {
	t.Parallel()
	z, x := make([]byte, 4096), bytes.Repeat([]byte{1}, 4096)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	assert.Equal(t, []zeroRun{{last: true}}, nonZeroRuns(nil, 2))
	assert.Equal(t, []zeroRun{{last: true}}, nonZeroRuns(cat(z, z, z), 2))
	assert.Equal(t, []zeroRun{{0, 4096, 0, true}}, nonZeroRuns(cat(x, z, z), 2))
	assert.Equal(t, []zeroRun{{0, 3 * 4096, 0, true}}, nonZeroRuns(cat(x, z, x), 2), "one zero page stays")
	assert.Equal(t, []zeroRun{{0, 4096, 3 * 4096, false}, {3 * 4096, 4 * 4096, 0, true}}, nonZeroRuns(cat(x, z, z, x), 2))
	assert.Equal(t, []zeroRun{{0, 0, 2 * 4096, false}, {2 * 4096, 2*4096 + 5, 0, true}}, nonZeroRuns(cat(z, z, x[:5]), 2),
		"leading zeros: an empty piece keeps the memory")
}
