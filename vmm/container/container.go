package container

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// The kinds of container, each named by its magic.
const (
	// MagicState is an encoded vmm.MachineState.
	MagicState = "GOVMMSTA"
	// MagicSnapshot is a snapshot file: a machine state and its pages.
	MagicSnapshot = "GOVMMSNP"
	// MagicCheckpoint is one replication checkpoint. It is never written
	// out whole: the stream's Begin frame stands for its header, each
	// Pages, Disk and State frame carries one of its sections, and the
	// End frame carries its checksum.
	MagicCheckpoint = "GOVMMCKP"
)

// Type is a section type. The numbers are one registry for every kind.
type Type uint16

const (
	// TypeEnd closes a container: its payload is the CRC32C of every
	// byte before it.
	TypeEnd Type = 1
	// TypeState holds an encoded machine state (a GOVMMSTA container).
	// A state may be cut into consecutive state sections: it is their
	// payloads concatenated.
	TypeState Type = 2
	// TypePages holds up to MaxPagesPerSection guest pages (ParsePages).
	TypePages Type = 3
	// TypeDisk holds one disk write or zero run (ParseDisk).
	TypeDisk Type = 4
	// TypeConfig holds a snapshot's settings: how the VM's devices were
	// configured (name/value pairs; package vmm's SnapshotConfig).
	TypeConfig Type = 5

	// The sections of a machine state (GOVMMSTA, version 4 on); package
	// vmm walks their payloads.

	// TypeMachine: the machine's shape and TSC rate.
	TypeMachine Type = 16
	// TypeVCPU: one vCPU's kernel state and CPUID.
	TypeVCPU Type = 17
	// TypeIRQChip: both PICs, the IOAPIC and the PIT.
	TypeIRQChip Type = 18
	// TypeClock: the KVM clock.
	TypeClock Type = 19
	// TypeDevice: one device's state.
	TypeDevice Type = 20
)

var typeNames = map[Type]string{
	TypeEnd: "end", TypeState: "state", TypePages: "pages", TypeDisk: "disk", TypeConfig: "config",
	TypeMachine: "machine", TypeVCPU: "vcpu", TypeIRQChip: "irqchip", TypeClock: "clock", TypeDevice: "device",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("section type %d", uint16(t))
}

// Sizes of the fixed parts.
const (
	// HeaderSize is the container header: magic, version, flags.
	HeaderSize = 12
	// SectionHeaderSize is a section's type, flags and length.
	SectionHeaderSize = 8
	// EndSize is the whole end section.
	EndSize = SectionHeaderSize + 4
)

// Errors. Every refusal of a reader wraps one of them.
var (
	// ErrNotContainer: not a container of the expected kind (wrong magic).
	ErrNotContainer = errors.New("not a govmm container of this kind")
	// ErrVersion: a version this reader does not know.
	ErrVersion = errors.New("container version not understood")
	// ErrFormat: malformed (an unknown section type, reserved bits set,
	// a section out of place, bytes after the end).
	ErrFormat = errors.New("malformed container")
	// ErrTruncated: the data ends before the end section.
	ErrTruncated = errors.New("container truncated")
	// ErrChecksum: the CRC32C does not match.
	ErrChecksum = errors.New("container checksum mismatch")
	// ErrTooLarge: a section longer than its cap.
	ErrTooLarge = errors.New("container section too large")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Header is a container's first 12 bytes.
type Header struct {
	Magic   string
	Version uint16
	Flags   uint16 // reserved, 0
}

func appendHeader(b []byte, h Header) []byte {
	b = append(b, h.Magic...)
	b = binary.LittleEndian.AppendUint16(b, h.Version)
	return binary.LittleEndian.AppendUint16(b, h.Flags)
}

// PeekHeader reads a header without checking it, for a caller that
// dispatches on the version (formats older than the container share its
// first ten bytes: magic and a version).
func PeekHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("%d bytes, shorter than a header: %w", len(b), ErrNotContainer)
	}
	return Header{Magic: string(b[:8]), Version: binary.LittleEndian.Uint16(b[8:]), Flags: binary.LittleEndian.Uint16(b[10:])}, nil
}

// Format is what a reader accepts: one kind, a range of versions, and
// the section types it knows with the largest payload of each.
type Format struct {
	Magic                  string
	MinVersion, MaxVersion uint16
	// Caps maps each section type the reader knows (TypeEnd aside) to
	// its largest payload; a type not listed is refused.
	Caps map[Type]int
}

// checkHeader checks a header against f.
func (f *Format) checkHeader(b []byte) (Header, error) {
	if len(b) < len(f.Magic) || string(b[:len(f.Magic)]) != f.Magic {
		return Header{}, fmt.Errorf("want %s: %w", f.Magic, ErrNotContainer)
	}
	h, err := PeekHeader(b)
	if err != nil {
		return h, fmt.Errorf("%s header: %w", f.Magic, ErrTruncated)
	}
	if h.Version < f.MinVersion || h.Version > f.MaxVersion {
		return h, fmt.Errorf("%s version %d, this govmm reads %d to %d: %w", f.Magic, h.Version, f.MinVersion, f.MaxVersion, ErrVersion)
	}
	if h.Flags != 0 {
		return h, fmt.Errorf("%s header flags %#x: %w", f.Magic, h.Flags, ErrFormat)
	}
	return h, nil
}

// sectionHeader is a section's first 8 bytes.
type sectionHeader struct {
	typ    Type
	flags  uint16
	length uint32
}

func appendSectionHeader(b []byte, t Type, n uint32) []byte {
	b = binary.LittleEndian.AppendUint16(b, uint16(t))
	b = binary.LittleEndian.AppendUint16(b, 0)
	return binary.LittleEndian.AppendUint32(b, n)
}

// checkSection parses a section header and checks it against f: known
// type, no flags, length within the type's cap (the end section: exactly
// 4). Nothing has been allocated for the payload yet.
func (f *Format) checkSection(b []byte) (sectionHeader, error) {
	s := sectionHeader{
		typ:    Type(binary.LittleEndian.Uint16(b)),
		flags:  binary.LittleEndian.Uint16(b[2:]),
		length: binary.LittleEndian.Uint32(b[4:]),
	}
	if s.flags != 0 {
		return s, fmt.Errorf("%v section flags %#x: %w", s.typ, s.flags, ErrFormat)
	}
	if s.typ == TypeEnd {
		if s.length != 4 {
			return s, fmt.Errorf("end section of %d bytes: %w", s.length, ErrFormat)
		}
		return s, nil
	}
	max, ok := f.Caps[s.typ]
	if !ok {
		return s, fmt.Errorf("%v in a %s container: %w", s.typ, f.Magic, ErrFormat)
	}
	if uint64(s.length) > uint64(max) {
		return s, fmt.Errorf("%v section of %d bytes, at most %d: %w", s.typ, s.length, max, ErrTooLarge)
	}
	return s, nil
}

// Checksum is the container's checksum rule: the CRC32C (Castagnoli) of
// the header and of every section before the end section, each as it is
// written (its 8-byte header, then its payload). Writer and Reader use
// it (the stream did too, up to its version 8, over a checkpoint whose
// sections travel in frames; it now has a checksum of its own that the
// lab's emulated CPU computes faster).
type Checksum struct{ crc uint32 }

// NewChecksum starts the checksum of a container with this header.
func NewChecksum(magic string, version uint16) Checksum {
	var c Checksum
	c.crc = crc32.Update(0, castagnoli, appendHeader(nil, Header{Magic: magic, Version: version}))
	return c
}

// Section adds a section whose payload is parts concatenated.
func (c *Checksum) Section(t Type, parts ...[]byte) {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	var h [SectionHeaderSize]byte
	c.crc = crc32.Update(c.crc, castagnoli, appendSectionHeader(h[:0], t, uint32(n)))
	for _, p := range parts {
		c.crc = crc32.Update(c.crc, castagnoli, p)
	}
}

// Sum32 is the checksum so far: what the end section carries.
func (c *Checksum) Sum32() uint32 { return c.crc }
