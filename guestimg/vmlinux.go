package guestimg

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os/exec"

	"github.com/klauspost/compress/zstd"
)

// Offsets in the bzImage setup header (Documentation/arch/x86/boot.rst).
const (
	hdrSetupSects    = 0x1f1
	hdrMagic         = 0x202
	hdrVersion       = 0x206
	hdrPayloadOffset = 0x248 // from the start of the protected-mode code
	hdrPayloadLength = 0x24c
	minPayloadProto  = 0x0208 // payload_offset/length came with 2.08
)

// ErrNoPayload is returned for a bzImage whose compressed kernel cannot be
// found or decompressed.
var ErrNoPayload = errors.New("bzImage has no usable compressed payload")

// ExtractVmlinux returns the uncompressed kernel (an ELF vmlinux, as the
// decompressor would have unpacked it) from a bzImage: the payload that
// the setup header's payload_offset and payload_length point at, in the
// codec its magic names. Debian's kernels are compressed with xz
// (CONFIG_KERNEL_XZ), with the x86 BCJ filter, which pure-Go xz readers do
// not implement: xz payloads go through the host's xz (the builder needs
// it already for compressed modules). gzip and zstd (Ubuntu's kernels)
// are decoded here.
func ExtractVmlinux(ctx context.Context, bz []byte) ([]byte, error) {
	if len(bz) < 0x260 || string(bz[hdrMagic:hdrMagic+4]) != "HdrS" {
		return nil, fmt.Errorf("%w: no setup header", ErrNoPayload)
	}
	le := binary.LittleEndian
	if v := le.Uint16(bz[hdrVersion:]); v < minPayloadProto {
		return nil, fmt.Errorf("%w: boot protocol %#x predates payload_offset", ErrNoPayload, v)
	}
	sects := int(bz[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	off := uint64((sects+1)*512) + uint64(le.Uint32(bz[hdrPayloadOffset:]))
	n := uint64(le.Uint32(bz[hdrPayloadLength:]))
	if n == 0 || off+n > uint64(len(bz)) {
		return nil, fmt.Errorf("%w: payload [%d, +%d) outside the %d-byte file", ErrNoPayload, off, n, len(bz))
	}
	payload := bz[off : off+n]
	var (
		out []byte
		err error
	)
	switch {
	case bytes.HasPrefix(payload, []byte("\xfd7zXZ\x00")):
		// The kernel appends the uncompressed size after the stream:
		// --single-stream ignores it.
		cmd := exec.CommandContext(ctx, "xz", "--decompress", "--stdout", "--single-stream")
		cmd.Stdin = bytes.NewReader(payload)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if out, err = cmd.Output(); err != nil {
			err = fmt.Errorf("xz: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
		}
	case bytes.HasPrefix(payload, []byte{0x1f, 0x8b}):
		var r *gzip.Reader
		if r, err = gzip.NewReader(bytes.NewReader(payload)); err == nil {
			r.Multistream(false)
			out, err = io.ReadAll(r)
		}
	case bytes.HasPrefix(payload, []byte{0x28, 0xb5, 0x2f, 0xfd}) && len(payload) > 4:
		// The kernel appends the uncompressed size (4 bytes) after the
		// frame.
		var d *zstd.Decoder
		if d, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<30)); err == nil {
			out, err = d.DecodeAll(payload[:len(payload)-4], nil)
			d.Close()
		}
	default:
		return nil, fmt.Errorf("%w: unknown codec (magic % x); xz, gzip and zstd are supported", ErrNoPayload, payload[:min(6, len(payload))])
	}
	if err != nil {
		return nil, fmt.Errorf("%w: decompress: %w", ErrNoPayload, err)
	}
	// The payload is vmlinux with the kernel's relocation table appended
	// (CONFIG_X86_NEED_RELOCS); the ELF reader stops where the ELF ends.
	f, err := elf.NewFile(bytes.NewReader(out))
	if err != nil {
		return nil, fmt.Errorf("%w: decompressed payload is not ELF: %w", ErrNoPayload, err)
	}
	if f.Machine != elf.EM_X86_64 {
		return nil, fmt.Errorf("%w: decompressed kernel is for %v", ErrNoPayload, f.Machine)
	}
	return out, nil
}

// TrimVmlinux makes a vmlinux smaller without changing what a loader puts
// in memory, so that a boot reads and copies fewer bytes:
//
//   - each PT_LOAD is split where it holds runs of at least packMinZero
//     zero pages: each piece keeps its non-zero bytes in the file and
//     covers the zeros after it as memory-only bytes (like bss, which a
//     loader zeroes or, in fresh guest RAM, leaves alone); trailing zeros
//     go the same way;
//   - the pieces are packed one after the other in the file (each at an
//     offset congruent to its address modulo the page size, p_align 4
//     KiB), without the up-to-2-MiB gaps the linker leaves between
//     segments;
//   - the notes (PT_NOTE: the PVH entry) are copied after them;
//   - the section headers, which no loader reads, are dropped.
//
// Debian's 6.1 kernel goes from 66 MB (39 MB with its trailing zeros
// trimmed alone) to about 32 MB.
func TrimVmlinux(b []byte) ([]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("trim vmlinux: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("trim vmlinux: %v %v, want 64-bit little-endian", f.Class, f.Data)
	}
	pieces, err := vmlinuxPieces(f, b)
	if err != nil {
		return nil, err
	}
	const ehdrSize, phdrSize = 64, 56
	if len(pieces) > 0xffff {
		return nil, fmt.Errorf("trim vmlinux: %d program headers do not fit", len(pieces))
	}
	off := uint64(ehdrSize + phdrSize*len(pieces))
	out := make([]byte, off)
	copy(out, b[:ehdrSize])
	le := binary.LittleEndian
	// Loadable pieces first, at page-congruent offsets; then everything
	// else (notes), byte-aligned at 8.
	for pass := 0; pass < 2; pass++ {
		for i := range pieces {
			pc := &pieces[i]
			if (pc.prog.Type == elf.PT_LOAD) != (pass == 0) {
				continue
			}
			if len(pc.data) == 0 {
				pc.prog.Off = 0
				continue
			}
			if pass == 0 {
				off += (pc.prog.Paddr - off) % pageSize
			} else {
				off = (off + 7) &^ 7
			}
			pc.prog.Off = off
			out = append(out, make([]byte, off-uint64(len(out)))...)
			out = append(out, pc.data...)
			off += uint64(len(pc.data))
		}
	}
	putProgHeaders(out[ehdrSize:], pieces)
	le.PutUint64(out[32:], ehdrSize)            // e_phoff
	le.PutUint16(out[54:], phdrSize)            // e_phentsize
	le.PutUint16(out[56:], uint16(len(pieces))) // e_phnum
	le.PutUint64(out[40:], 0)                   // e_shoff
	le.PutUint16(out[58:], 0)                   // e_shentsize
	le.PutUint16(out[60:], 0)                   // e_shnum
	le.PutUint16(out[62:], 0)                   // e_shstrndx
	return out, nil
}

// vmlinuxPiece is one program header of a packed vmlinux and its bytes.
type vmlinuxPiece struct {
	prog elf.ProgHeader
	data []byte
}

// vmlinuxPieces splits f's PT_LOAD segments at runs of zero pages (the
// zeros become memory beyond a piece's file bytes) and keeps the other
// program headers (notes) whole.
func vmlinuxPieces(f *elf.File, b []byte) ([]vmlinuxPiece, error) {
	var pieces []vmlinuxPiece
	for i, p := range f.Progs {
		if p.Off+p.Filesz > uint64(len(b)) || p.Off+p.Filesz < p.Off {
			return nil, fmt.Errorf("trim vmlinux: segment %d lies past the end of the file", i)
		}
		data := b[p.Off : p.Off+p.Filesz]
		if p.Type != elf.PT_LOAD {
			pieces = append(pieces, vmlinuxPiece{p.ProgHeader, data})
			continue
		}
		for _, r := range nonZeroRuns(data, packMinZero) {
			q := p.ProgHeader
			q.Off = p.Off + r.start // the old offset, for notes inside
			q.Paddr += r.start
			q.Vaddr += r.start
			q.Filesz = r.end - r.start
			q.Memsz = r.memEnd - r.start
			if r.last {
				q.Memsz = p.Memsz - r.start
			}
			q.Align = pageSize
			pieces = append(pieces, vmlinuxPiece{q, data[r.start:r.end]})
		}
	}
	return pieces, nil
}

// putProgHeaders writes pieces' 64-bit program headers (56 bytes each)
// into dst.
func putProgHeaders(dst []byte, pieces []vmlinuxPiece) {
	le := binary.LittleEndian
	for i, pc := range pieces {
		h := dst[56*i:]
		p := pc.prog
		le.PutUint32(h[0:], uint32(p.Type))
		le.PutUint32(h[4:], uint32(p.Flags))
		le.PutUint64(h[8:], p.Off)
		le.PutUint64(h[16:], p.Vaddr)
		le.PutUint64(h[24:], p.Paddr)
		le.PutUint64(h[32:], p.Filesz)
		le.PutUint64(h[40:], p.Memsz)
		le.PutUint64(h[48:], p.Align)
	}
}

const pageSize = 4096

// packMinZero is the shortest run of zero pages TrimVmlinux takes out of a
// segment's file bytes: a split costs a program header and up to a page
// of alignment padding.
const packMinZero = 2

// zeroRun is one piece of a segment's file bytes, [start, end) not zero
// at its ends, followed by zeros up to memEnd (the next piece's start);
// the last piece is followed by the rest of the segment.
type zeroRun struct {
	start, end, memEnd uint64
	last               bool
}

// nonZeroRuns splits data at runs of at least minPages zero pages (pages
// counted from data's start) and trims each piece's trailing zeros. Zeros
// at the start become a piece with no file bytes, so that the pieces'
// memory still starts where data's does.
func nonZeroRuns(data []byte, minPages int) []zeroRun {
	var runs []zeroRun
	n := uint64(len(data))
	cur, zeros := int64(-1), uint64(0) // cur: start of the open piece
	closeAt := func(end uint64) {
		s := uint64(cur)
		runs = append(runs, zeroRun{start: s, end: s + uint64(len(bytes.TrimRight(data[s:end], "\x00")))})
	}
	for pg := uint64(0); pg < n; pg += pageSize {
		if isZero(data[pg:min(pg+pageSize, n)]) {
			zeros++
			continue
		}
		switch {
		case cur < 0:
			cur = int64(pg)
		case zeros >= uint64(minPages):
			closeAt(pg - zeros*pageSize)
			cur = int64(pg)
		}
		zeros = 0
	}
	if cur >= 0 {
		closeAt(n)
	}
	if len(runs) == 0 || runs[0].start > 0 {
		runs = append([]zeroRun{{}}, runs...)
	}
	for i := range runs[:len(runs)-1] {
		runs[i].memEnd = runs[i+1].start
	}
	runs[len(runs)-1].last = true
	return runs
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
