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
