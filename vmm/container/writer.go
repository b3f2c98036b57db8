package container

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
)

// Writer writes a container section by section, computing the checksum
// on the way, so a multi-GB snapshot never needs to be in memory whole.
// Its first error sticks. Wrap a file in a bufio.Writer: Writer writes
// each section header and part as it comes.
type Writer struct {
	w   io.Writer
	sum Checksum
	n   int64
	err error
	end bool
}

// NewWriter writes the header of a container of kind magic (8 bytes) and
// version.
func NewWriter(w io.Writer, magic string, version uint16) (*Writer, error) {
	if len(magic) != 8 {
		return nil, fmt.Errorf("container magic %q: want 8 bytes", magic)
	}
	cw := &Writer{w: w, sum: NewChecksum(magic, version)}
	cw.write(appendHeader(nil, Header{Magic: magic, Version: version}))
	return cw, cw.err
}

func (w *Writer) write(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.n += int64(n)
	if err != nil {
		w.err = fmt.Errorf("write container: %w", err)
	}
}

// Section writes one section of type t whose payload is parts
// concatenated.
func (w *Writer) Section(t Type, parts ...[]byte) error {
	if w.end {
		return fmt.Errorf("%v section after the end: %w", t, ErrFormat)
	}
	if t == TypeEnd {
		return fmt.Errorf("end section: use Close: %w", ErrFormat)
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > math.MaxUint32 {
		return fmt.Errorf("%v section of %d bytes: %w", t, n, ErrTooLarge)
	}
	var h [SectionHeaderSize]byte
	w.write(appendSectionHeader(h[:0], t, uint32(n)))
	for _, p := range parts {
		w.write(p)
	}
	w.sum.Section(t, parts...)
	return w.err
}

// Close writes the end section with the checksum. It does not close the
// underlying writer.
func (w *Writer) Close() error {
	if w.end {
		return w.err
	}
	w.end = true
	var b [EndSize]byte
	end := appendSectionHeader(b[:0], TypeEnd, 4)
	w.write(binary.LittleEndian.AppendUint32(end, w.sum.Sum32()))
	return w.err
}

// Len is the number of bytes written so far.
func (w *Writer) Len() int64 { return w.n }
