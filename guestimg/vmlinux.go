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
// it already for compressed modules). gzip is decoded here.
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
	default:
		return nil, fmt.Errorf("%w: unknown codec (magic % x); xz and gzip are supported", ErrNoPayload, payload[:min(6, len(payload))])
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
// in memory: each PT_LOAD's file part loses its trailing zero bytes (they
// become memory-only, like bss, which a loader zeroes or, in fresh guest
// RAM, leaves alone), the file ends after the last segment's bytes, and
// the section headers, which no loader reads, are dropped. Debian's last
// segment is 26 MB of which 2.6 MB are not zero (bss and brk follow
// .init), so the file shrinks by a third.
func TrimVmlinux(b []byte) ([]byte, error) {
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("trim vmlinux: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("trim vmlinux: %v %v, want 64-bit little-endian", f.Class, f.Data)
	}
	le := binary.LittleEndian
	phoff, phentsize := le.Uint64(b[32:]), uint64(le.Uint16(b[54:]))
	end := phoff + phentsize*uint64(len(f.Progs))
	filesz := make([]uint64, len(f.Progs))
	for i, p := range f.Progs {
		filesz[i] = p.Filesz
		if p.Off+p.Filesz > uint64(len(b)) {
			return nil, fmt.Errorf("trim vmlinux: segment %d lies past the end of the file", i)
		}
		if p.Type == elf.PT_LOAD {
			filesz[i] = uint64(len(bytes.TrimRight(b[p.Off:p.Off+p.Filesz], "\x00")))
		}
		end = max(end, p.Off+filesz[i])
	}
	out := append([]byte(nil), b[:end]...)
	for i := range f.Progs {
		le.PutUint64(out[phoff+uint64(i)*phentsize+32:], filesz[i])
	}
	le.PutUint64(out[40:], 0) // e_shoff
	le.PutUint16(out[60:], 0) // e_shnum
	le.PutUint16(out[62:], 0) // e_shstrndx
	return out, nil
}
