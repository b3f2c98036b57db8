package container

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Page sections carry guest pages, in snapshot files and in the stream's
// Pages frames alike:
//
//	count u16 (1..MaxPagesPerSection) | flags u16 |
//	count × (gpa u64 | encoding u8 | 0 [3] | length u32 | data [length])
//
// or, with flag bit 0 (SectionGrouped), the entries' headers first and
// their data after them, in the same order, from the first multiple of
// 64 bytes into the section (GroupedDataOffset; zeros in between):
//
//	count u16 | 1 u16 | count × (gpa u64 | encoding u8 | 0 [3] |
//	length u32) | 0 [to a multiple of 64] | each entry's data [length]
//
// A writer that sends pages from where they lie (a stream's stored Pages
// frame, written with writev) lays them out grouped: a run of pages
// that lie back to back in its memory then goes out as one piece, where
// interleaved each 16-byte header costs the kernel's copy a piece of its
// own. The padding ends the headers on a boundary of the 32-byte blocks
// the stream's End sum runs on, so that they are summed as whole blocks.
// Other flags are refused.
//
// encoding 0 raw (length PageSize), 1 zero (length 0: the page is all
// zero), 2 xor (length XORSize: the CRC32C of the new page, then the new
// page XORed with the version of it last shipped on the same stream), 3
// copy (length CopySize: the CRC32C of the new page, then the gpa u64 of
// a page whose version last shipped on the same stream has the same
// bytes); only a stream that agreed on deltas takes xor and copy,
// ParsePagesDeltas, never a snapshot. Every gpa (a copy's source too) is
// page-aligned; which addresses exist is the reader's to check (its
// machine's memory, the stream's announced layout).
const (
	// PageSize is the size of a guest page.
	PageSize = 4096
	// MaxPagesPerSection caps the entries in one page section.
	MaxPagesPerSection = 256
	// PageEntrySize is an entry's fixed part: gpa, encoding, length.
	PageEntrySize = 16
	// XORSize is an xor entry's data: CRC32C u32 and the XOR.
	XORSize = 4 + PageSize
	// CopySize is a copy entry's data: CRC32C u32 and the source gpa u64.
	CopySize = 4 + 8
	// MaxPagesPayload is the largest page section: all pages xor.
	MaxPagesPayload = 4 + MaxPagesPerSection*(PageEntrySize+XORSize)
)

// SectionGrouped is the flag of a page section whose entries' headers
// all come before their data.
const SectionGrouped = 1 << 0

// GroupedDataOffset is where the data of a grouped page section of n
// entries starts: the count, flags and n headers, rounded up to 64
// bytes.
func GroupedDataOffset(n int) int { return (4 + n*PageEntrySize + 63) &^ 63 }

// Encoding says how one page is stored in a page section.
type Encoding uint8

const (
	// EncRaw: PageSize bytes.
	EncRaw Encoding = 0
	// EncZero: an all-zero page, without bytes.
	EncZero Encoding = 1
	// EncXOR: the page's CRC32C (u32), then the page XORed with the
	// version last shipped on the same stream (a stream's codec then
	// compresses the mostly-zero result). Streams only.
	EncXOR Encoding = 2
	// EncCopy: the page's CRC32C (u32), then the gpa (u64) of a page
	// whose version last shipped on the same stream holds the same
	// bytes (itself, unchanged, or a duplicate elsewhere). Streams only.
	EncCopy Encoding = 3
)

// Page is one entry of a page section.
type Page struct {
	GPA  uint64
	Enc  Encoding
	Data []byte // PageSize bytes for EncRaw, XORSize for EncXOR, CopySize for EncCopy, nil for EncZero
}

// PageSection builds one page section's payload. The zero value is
// ready; Reset starts the next section in the same buffer.
type PageSection struct {
	// Headroom is how many bytes the buffer keeps free in front of the
	// payload, for a caller that sends the section behind a header of its
	// own without copying it (Framed). Set it before the first Add.
	Headroom int
	buf      []byte
	n        int
}

// Reset empties the section, keeping its buffer.
func (s *PageSection) Reset() { s.buf, s.n = s.buf[:0], 0 }

// Add appends the page at gpa: raw if data is PageSize bytes, zero if
// data is nil. The caller decides which (and keeps Len below
// MaxPagesPerSection).
func (s *PageSection) Add(gpa uint64, data []byte) {
	s.start()
	enc := EncRaw
	if data == nil {
		enc = EncZero
	}
	s.buf = AppendEntryHeader(s.buf, gpa, enc, len(data))
	s.buf = append(s.buf, data...)
	s.n++
}

// EntryHeaderSize is the size of a page entry's header: gpa, encoding,
// reserved bytes, length.
const EntryHeaderSize = 16

// AppendEntryHeader appends the header of a page entry (gpa, enc, n
// bytes of data) to b: for a writer that sends the data from where it
// lies, behind the header, instead of copying it into a section (a
// stream's stored Pages frame written with writev).
func AppendEntryHeader(b []byte, gpa uint64, enc Encoding, n int) []byte {
	b = binary.LittleEndian.AppendUint64(b, gpa)
	b = append(b, byte(enc), 0, 0, 0)
	return binary.LittleEndian.AppendUint32(b, uint32(n))
}

// AddCopy appends the page at gpa (PageSize bytes), copied, as a raw
// page, or as a zero page when the copy is all zero, and reports which.
// The test is made on the copy, so that the entry describes the bytes the
// section holds even if data changes meanwhile (a running guest's page),
// and the page is read from memory once.
func (s *PageSection) AddCopy(gpa uint64, data []byte) (zero bool) {
	s.start()
	at := len(s.buf)
	s.buf = binary.LittleEndian.AppendUint64(s.buf, gpa)
	s.buf = append(s.buf, byte(EncRaw), 0, 0, 0)
	s.buf = binary.LittleEndian.AppendUint32(s.buf, uint32(len(data)))
	pg := len(s.buf)
	s.buf = append(s.buf, data...)
	if !bytes.Equal(s.buf[pg:], zeroPage[:]) {
		s.n++
		return false
	}
	s.buf = s.buf[:at]
	s.Add(gpa, nil)
	return true
}

var zeroPage [PageSize]byte

// AddXOR appends the page at gpa as a delta: crc is the new page's
// CRC32C, xor the new page XORed with the version last shipped
// (PageSize bytes).
func (s *PageSection) AddXOR(gpa uint64, crc uint32, xor []byte) {
	s.start()
	s.buf = binary.LittleEndian.AppendUint64(s.buf, gpa)
	s.buf = append(s.buf, byte(EncXOR), 0, 0, 0)
	s.buf = binary.LittleEndian.AppendUint32(s.buf, XORSize)
	s.buf = binary.LittleEndian.AppendUint32(s.buf, crc)
	s.buf = append(s.buf, xor...)
	s.n++
}

// AddCopyOf appends the page at gpa as a copy: crc is its CRC32C, src
// the gpa of a page whose version last shipped holds the same bytes.
func (s *PageSection) AddCopyOf(gpa uint64, crc uint32, src uint64) {
	s.start()
	s.buf = binary.LittleEndian.AppendUint64(s.buf, gpa)
	s.buf = append(s.buf, byte(EncCopy), 0, 0, 0)
	s.buf = binary.LittleEndian.AppendUint32(s.buf, CopySize)
	s.buf = binary.LittleEndian.AppendUint32(s.buf, crc)
	s.buf = binary.LittleEndian.AppendUint64(s.buf, src)
	s.n++
}

// Len is the number of pages added since the last Reset.
func (s *PageSection) Len() int { return s.n }

// Payload is the section's payload (valid until the next Add or Reset);
// nil while it holds no page (a page section holds at least one).
func (s *PageSection) Payload() []byte {
	if s.n == 0 {
		return nil
	}
	binary.LittleEndian.PutUint16(s.buf[s.Headroom:], uint16(s.n))
	return s.buf[s.Headroom:]
}

// Framed is Payload with the Headroom bytes in front of it, free for the
// caller's header (valid as Payload is); nil while it holds no page.
func (s *PageSection) Framed() []byte {
	if s.Payload() == nil {
		return nil
	}
	return s.buf
}

// start begins a section in an empty buffer: the headroom, then the
// count and reserved bytes that Payload fills in.
func (s *PageSection) start() {
	if len(s.buf) > 0 {
		return
	}
	if s.buf == nil {
		s.buf = make([]byte, 0, s.Headroom+MaxPagesPayload)
	}
	s.buf = append(s.buf[:s.Headroom], 0, 0, 0, 0) // count, reserved
}

// ParsePages decodes a page section's payload into pages (reusing its
// backing array), checking the count, reserved bytes, alignment,
// encodings and lengths; xor entries are refused. The pages' Data alias
// p.
func ParsePages(p []byte, pages []Page) ([]Page, error) { return parsePages(p, pages, false) }

// ParsePagesDeltas is ParsePages for a stream that agreed on deltas: it
// also takes xor and copy entries (whose base the stream checks; a copy's
// source is only checked for alignment here).
func ParsePagesDeltas(p []byte, pages []Page) ([]Page, error) { return parsePages(p, pages, true) }

func parsePages(p []byte, pages []Page, deltas bool) ([]Page, error) {
	le := binary.LittleEndian
	if len(p) < 4 {
		return pages, fmt.Errorf("page section of %d bytes: %w", len(p), ErrFormat)
	}
	n := int(le.Uint16(p))
	if n == 0 || n > MaxPagesPerSection {
		return pages, fmt.Errorf("page section with %d pages, want 1..%d: %w", n, MaxPagesPerSection, ErrTooLarge)
	}
	flags := le.Uint16(p[2:])
	if flags&^SectionGrouped != 0 {
		return pages, fmt.Errorf("page section: unknown flags %#x: %w", flags, ErrFormat)
	}
	grouped := flags&SectionGrouped != 0
	pages = pages[:0]
	off, head := 4, 4 // where the next entry's data, and its header, start
	if grouped {
		off = GroupedDataOffset(n)
		if len(p) < off {
			return pages, fmt.Errorf("page section: %d entries' headers truncated: %w", n, ErrFormat)
		}
		if !isZero(p[4+n*PageEntrySize : off]) {
			return pages, fmt.Errorf("page section: padding after the headers not zero: %w", ErrFormat)
		}
	}
	for i := range n {
		if !grouped {
			head = off
			off += PageEntrySize
		}
		if len(p) < off || len(p)-head < PageEntrySize {
			return pages, fmt.Errorf("page section: entry %d truncated: %w", i, ErrFormat)
		}
		e := p[head : head+PageEntrySize]
		head += PageEntrySize
		pg := Page{GPA: le.Uint64(e), Enc: Encoding(e[8])}
		length := le.Uint32(e[12:])
		switch {
		case e[9] != 0 || e[10] != 0 || e[11] != 0:
			return pages, fmt.Errorf("page %#x: reserved bytes set: %w", pg.GPA, ErrFormat)
		case pg.GPA%PageSize != 0:
			return pages, fmt.Errorf("page %#x: not page-aligned: %w", pg.GPA, ErrFormat)
		case pg.Enc == EncRaw && length != PageSize:
			return pages, fmt.Errorf("raw page %#x: %d bytes: %w", pg.GPA, length, ErrFormat)
		case pg.Enc == EncRaw && len(p)-off < PageSize:
			return pages, fmt.Errorf("raw page %#x: truncated: %w", pg.GPA, ErrFormat)
		case pg.Enc == EncZero && length != 0:
			return pages, fmt.Errorf("zero page %#x: %d bytes: %w", pg.GPA, length, ErrFormat)
		case pg.Enc == EncXOR && deltas && length != XORSize:
			return pages, fmt.Errorf("xor page %#x: %d bytes: %w", pg.GPA, length, ErrFormat)
		case pg.Enc == EncXOR && deltas && len(p)-off < XORSize:
			return pages, fmt.Errorf("xor page %#x: truncated: %w", pg.GPA, ErrFormat)
		case pg.Enc == EncCopy && deltas && length != CopySize:
			return pages, fmt.Errorf("copy page %#x: %d bytes: %w", pg.GPA, length, ErrFormat)
		case pg.Enc == EncCopy && deltas && len(p)-off < CopySize:
			return pages, fmt.Errorf("copy page %#x: truncated: %w", pg.GPA, ErrFormat)
		case pg.Enc == EncCopy && deltas && le.Uint64(p[off+4:])%PageSize != 0:
			return pages, fmt.Errorf("copy page %#x: source %#x not page-aligned: %w", pg.GPA, le.Uint64(p[off+4:]), ErrFormat)
		case pg.Enc != EncRaw && pg.Enc != EncZero && ((pg.Enc != EncXOR && pg.Enc != EncCopy) || !deltas):
			return pages, fmt.Errorf("page %#x: encoding %d not supported: %w", pg.GPA, pg.Enc, ErrFormat)
		}
		switch pg.Enc {
		case EncRaw:
			pg.Data = p[off : off+PageSize : off+PageSize]
			off += PageSize
		case EncXOR:
			pg.Data = p[off : off+XORSize : off+XORSize]
			off += XORSize
		case EncCopy:
			pg.Data = p[off : off+CopySize : off+CopySize]
			off += CopySize
		}
		pages = append(pages, pg)
	}
	if off != len(p) {
		return pages, fmt.Errorf("page section: %d trailing bytes: %w", len(p)-off, ErrFormat)
	}
	return pages, nil
}

// Disk sections carry one write to a disk, or a run of zeroes:
//
//	disk u16 | flags u16 (bit 0: zero run) | length u32 (1..MaxDiskChunk) |
//	offset u64 | data [length] (none for a zero run)
const (
	// DiskHeaderSize is a disk section's fixed part.
	DiskHeaderSize = 16
	// MaxDiskChunk caps the bytes one disk section writes (or zeroes).
	MaxDiskChunk = 1 << 20
	// MaxDiskPayload is the largest disk section.
	MaxDiskPayload = DiskHeaderSize + MaxDiskChunk

	diskFlagZero = 1 << 0
)

// DiskWrite is one decoded disk section.
type DiskWrite struct {
	Disk   uint16
	Off    uint64
	Length int
	Zero   bool   // a run of Length zero bytes
	Data   []byte // Length bytes unless Zero; aliases the payload
}

// AppendDisk appends a disk section's payload to b: data at off on disk,
// or, with data nil, a run of n zero bytes.
func AppendDisk(b []byte, disk uint16, off uint64, n int, data []byte) []byte {
	le := binary.LittleEndian
	var flags uint16
	if data == nil {
		flags = diskFlagZero
	}
	b = le.AppendUint16(b, disk)
	b = le.AppendUint16(b, flags)
	b = le.AppendUint32(b, uint32(n))
	b = le.AppendUint64(b, off)
	return append(b, data...)
}

// ParseDisk decodes a disk section's payload, checking its flags and
// lengths. Which disks and offsets exist is the reader's to check.
func ParseDisk(p []byte) (DiskWrite, error) {
	le := binary.LittleEndian
	if len(p) < DiskHeaderSize {
		return DiskWrite{}, fmt.Errorf("disk section of %d bytes: %w", len(p), ErrFormat)
	}
	flags, n := le.Uint16(p[2:]), le.Uint32(p[4:])
	w := DiskWrite{Disk: le.Uint16(p), Off: le.Uint64(p[8:]), Length: int(n), Zero: flags&diskFlagZero != 0}
	switch {
	case flags&^diskFlagZero != 0:
		return w, fmt.Errorf("disk section: unknown flags %#x: %w", flags, ErrFormat)
	case n == 0 || n > MaxDiskChunk:
		return w, fmt.Errorf("disk section: %d bytes, want 1..%d: %w", n, MaxDiskChunk, ErrFormat)
	case w.Zero && len(p) != DiskHeaderSize:
		return w, fmt.Errorf("disk section: zero run with %d data bytes: %w", len(p)-DiskHeaderSize, ErrFormat)
	case !w.Zero && len(p) != DiskHeaderSize+int(n):
		return w, fmt.Errorf("disk section: %d data bytes, header says %d: %w", len(p)-DiskHeaderSize, n, ErrFormat)
	}
	if !w.Zero {
		w.Data = p[DiskHeaderSize:]
	}
	return w, nil
}

// AppendGroupedSection appends a grouped page section (SectionGrouped)
// of pages, 1 to MaxPagesPerSection of them, their data copied, to b:
// the layout a stream's stored Pages frame sends from where its pages
// lie, built whole (for tests and tools).
func AppendGroupedSection(b []byte, pages []Page) []byte {
	start := len(b)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(pages)))
	b = binary.LittleEndian.AppendUint16(b, SectionGrouped)
	for _, pg := range pages {
		b = AppendEntryHeader(b, pg.GPA, pg.Enc, len(pg.Data))
	}
	b = append(b, make([]byte, start+GroupedDataOffset(len(pages))-len(b))...)
	for _, pg := range pages {
		b = append(b, pg.Data...)
	}
	return b
}

// isZero reports whether b is all zero bytes.
func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
