package container

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Section is one section of a container.
type Section struct {
	Type    Type
	Payload []byte
}

// Parse checks a whole container held in memory against f and returns
// its header and its sections (the end section left out), whose payloads
// alias data. It verifies the checksum before it returns any section.
func Parse(data []byte, f Format) (Header, []Section, error) {
	h, err := f.checkHeader(data)
	if err != nil {
		return h, nil, err
	}
	sum := NewChecksum(h.Magic, h.Version)
	var out []Section
	off := HeaderSize
	for {
		if len(data)-off < SectionHeaderSize {
			return h, nil, fmt.Errorf("%s: ends after %d bytes without an end section: %w", f.Magic, len(data), ErrTruncated)
		}
		s, err := f.checkSection(data[off:])
		if err != nil {
			return h, nil, fmt.Errorf("%s at byte %d: %w", f.Magic, off, err)
		}
		off += SectionHeaderSize
		if uint64(len(data)-off) < uint64(s.length) {
			return h, nil, fmt.Errorf("%s: %v section of %d bytes, %d left: %w", f.Magic, s.typ, s.length, len(data)-off, ErrTruncated)
		}
		end := off + int(s.length)
		p := data[off:end:end]
		off = end
		if s.typ == TypeEnd {
			if got, want := binary.LittleEndian.Uint32(p), sum.Sum32(); got != want {
				return h, nil, fmt.Errorf("%s: crc32c %#08x, computed %#08x: %w", f.Magic, got, want, ErrChecksum)
			}
			if off != len(data) {
				return h, nil, fmt.Errorf("%s: %d bytes after the end section: %w", f.Magic, len(data)-off, ErrFormat)
			}
			return h, out, nil
		}
		sum.Section(s.typ, p)
		out = append(out, Section{Type: s.typ, Payload: p})
	}
}

// Reader reads a container from a stream (a multi-GB snapshot file)
// section by section. Every length is checked against its cap before a
// byte of the payload is read. The checksum is verified only at the end
// section, when Next returns io.EOF: a caller must not act irreversibly
// on a payload before then. Its first error sticks.
type Reader struct {
	r   io.Reader
	f   Format
	h   Header
	sum Checksum
	buf []byte // the last payload; reused
	err error
}

// NewReader reads and checks the header of a container of format f.
func NewReader(r io.Reader, f Format) (*Reader, error) {
	var b [HeaderSize]byte
	n, err := io.ReadFull(r, b[:])
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, fmt.Errorf("read %s header: %w", f.Magic, err)
	}
	h, err := f.checkHeader(b[:n]) // a short header: ErrNotContainer or ErrTruncated
	if err != nil {
		return nil, err
	}
	return &Reader{r: r, f: f, h: h, sum: NewChecksum(h.Magic, h.Version)}, nil
}

// Header is the container's header.
func (r *Reader) Header() Header { return r.h }

// Next returns the next section; its payload is valid until the next
// call. At the end section it verifies the checksum, checks that nothing
// follows, and returns io.EOF.
func (r *Reader) Next() (Section, error) {
	if r.err != nil {
		return Section{}, r.err
	}
	s, err := r.next()
	if err != nil {
		r.err = err
	}
	return s, err
}

func (r *Reader) next() (Section, error) {
	var hb [SectionHeaderSize]byte
	if _, err := io.ReadFull(r.r, hb[:]); err != nil {
		return Section{}, r.readErr("a section header", err)
	}
	s, err := r.f.checkSection(hb[:])
	if err != nil {
		return Section{}, fmt.Errorf("%s: %w", r.f.Magic, err)
	}
	if cap(r.buf) < int(s.length) {
		r.buf = make([]byte, s.length)
	}
	p := r.buf[:s.length]
	if _, err := io.ReadFull(r.r, p); err != nil {
		return Section{}, r.readErr(s.typ.String()+" section", err)
	}
	if s.typ != TypeEnd {
		r.sum.Section(s.typ, p)
		return Section{Type: s.typ, Payload: p}, nil
	}
	if got, want := binary.LittleEndian.Uint32(p), r.sum.Sum32(); got != want {
		return Section{}, fmt.Errorf("%s: crc32c %#08x, computed %#08x: %w", r.f.Magic, got, want, ErrChecksum)
	}
	var one [1]byte
	if n, _ := io.ReadFull(r.r, one[:]); n != 0 {
		return Section{}, fmt.Errorf("%s: bytes after the end section: %w", r.f.Magic, ErrFormat)
	}
	return Section{}, io.EOF
}

func (r *Reader) readErr(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%s: ends inside %s: %w", r.f.Magic, what, ErrTruncated)
	}
	return fmt.Errorf("read %s: %w", r.f.Magic, err)
}
