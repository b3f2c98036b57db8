package devstate

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// State is one device's saved state.
type State struct {
	ID      string // stable across restore, e.g. "virtio-net0"
	Kind    string // e.g. "virtio-net"; restore refuses a different kind
	Version uint16 // the device's own state version
	Data    []byte // encoded by the device itself
}

// Stateful devices are part of every checkpoint. The machine calls Quiesce
// on every device after the vCPUs are paused, then SaveState or
// RestoreState, then Resume. A device names itself once, through StateID
// and StateKind: the machine registers it under them, and its State
// carries the same two.
type Stateful interface {
	StateID() string   // stable across restore, e.g. "virtio-net0"
	StateKind() string // e.g. "virtio-net"; restore refuses another kind
	// Quiesce stops the device at a request boundary: no request is half
	// done, and the device writes no guest memory until Resume.
	Quiesce(ctx context.Context) error
	SaveState() (State, error)
	RestoreState(State) error
	Resume() error
}

// ErrShort is returned by a Decoder that ran out of bytes.
var ErrShort = errors.New("device state: truncated")

// Encoder appends fields in the package's layout.
type Encoder struct{ buf []byte }

// Bytes returns what was encoded.
func (e *Encoder) Bytes() []byte { return e.buf }

func (e *Encoder) U8(v uint8)   { e.buf = append(e.buf, v) }
func (e *Encoder) U16(v uint16) { e.buf = binary.LittleEndian.AppendUint16(e.buf, v) }
func (e *Encoder) U32(v uint32) { e.buf = binary.LittleEndian.AppendUint32(e.buf, v) }
func (e *Encoder) U64(v uint64) { e.buf = binary.LittleEndian.AppendUint64(e.buf, v) }

// Bool encodes v as one byte.
func (e *Encoder) Bool(v bool) {
	if v {
		e.U8(1)
	} else {
		e.U8(0)
	}
}

// Blob encodes a length-prefixed byte string.
func (e *Encoder) Blob(b []byte) {
	e.U32(uint32(len(b)))
	e.buf = append(e.buf, b...)
}

// String encodes a length-prefixed string.
func (e *Encoder) String(s string) { e.Blob([]byte(s)) }

// Decoder reads fields in the package's layout. After the first error every
// read returns zero and Err reports that first error.
type Decoder struct {
	buf []byte
	err error
}

// NewDecoder reads from b.
func NewDecoder(b []byte) *Decoder { return &Decoder{buf: b} }

// Err is the first error met, or nil.
func (d *Decoder) Err() error { return d.err }

// Fail records err as the decoder's error (the first one sticks), for
// callers that check a decoded value themselves.
func (d *Decoder) Fail(err error) {
	if d.err == nil {
		d.err = err
	}
}

// Done returns Err, or an error if bytes are left over.
func (d *Decoder) Done() error {
	if d.err == nil && len(d.buf) != 0 {
		d.err = fmt.Errorf("device state: %d trailing bytes", len(d.buf))
	}
	return d.err
}

func (d *Decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.buf) {
		d.err = ErrShort
		return nil
	}
	b := d.buf[:n:n]
	d.buf = d.buf[n:]
	return b
}

func (d *Decoder) U8() uint8 {
	if b := d.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *Decoder) U16() uint16 {
	if b := d.take(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (d *Decoder) U32() uint32 {
	if b := d.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (d *Decoder) U64() uint64 {
	if b := d.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

// Bool decodes one byte; anything but 0 or 1 is an error.
func (d *Decoder) Bool() bool {
	v := d.U8()
	if v > 1 && d.err == nil {
		d.err = fmt.Errorf("device state: bad bool %d", v)
	}
	return v == 1
}

// Blob decodes a length-prefixed byte string of at most max bytes. The
// length is checked against max and against what is left before any
// allocation. The result is a copy.
func (d *Decoder) Blob(max int) []byte {
	n := d.U32()
	if d.err != nil {
		return nil
	}
	if uint64(n) > uint64(max) || n > math.MaxInt32 {
		d.err = fmt.Errorf("device state: blob of %d bytes exceeds %d", n, max)
		return nil
	}
	b := d.take(int(n))
	if b == nil {
		return nil
	}
	return append([]byte(nil), b...)
}

// exact decodes a length-prefixed byte string that must be len(p) bytes
// long into p, copying it once, with nothing allocated.
func (d *Decoder) exact(p []byte) {
	n := d.U32()
	if d.err != nil {
		return
	}
	if uint64(n) != uint64(len(p)) {
		d.err = fmt.Errorf("device state: %d bytes, want %d", n, len(p))
		return
	}
	if b := d.take(len(p)); b != nil {
		copy(p, b)
	}
}

// u32s decodes len(p) uint32s into p (zeros after an error, as U32).
func (d *Decoder) u32s(p []uint32) {
	b := d.take(4 * len(p))
	if b == nil {
		clear(p)
		return
	}
	for i := range p {
		p[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
}

// String decodes a length-prefixed string of at most max bytes.
func (d *Decoder) String(max int) string { return string(d.Blob(max)) }
