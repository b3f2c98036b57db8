package devstate

import "fmt"

// Codec walks the fields of one state struct in a fixed order, encoding
// or decoding them. A device writes that order once, as a method taking
// a *Codec, and both its save and its restore go through it, so the two
// cannot drift apart:
//
//	func (s *uartState) walk(c *devstate.Codec) {
//		c.U8(&s.IER)
//		c.Bytes(&s.RX, uartRxMax)
//	}
//
//	data := devstate.Encode(s.walk)     // save
//	err := devstate.Decode(data, s.walk) // restore
//
// While decoding, every length is checked against its cap and what is
// left before anything is allocated, and the first error sticks (every
// later field reads as zero), so walk never checks errors itself.
type Codec struct {
	enc *Encoder // set when encoding
	dec *Decoder // set when decoding
}

// Encode runs walk over a state struct and returns its encoding.
func Encode(walk func(*Codec)) []byte {
	var e Encoder
	walk(&Codec{enc: &e})
	return e.Bytes()
}

// EncodeAppend is Encode appending to dst (whose room it reuses).
func EncodeAppend(dst []byte, walk func(*Codec)) []byte {
	e := Encoder{buf: dst}
	walk(&Codec{enc: &e})
	return e.Bytes()
}

// Decode runs walk over data into a state struct. It fails if data is
// short, a length exceeds its cap, or bytes are left over.
func Decode(data []byte, walk func(*Codec)) error {
	d := NewDecoder(data)
	walk(&Codec{dec: d})
	return d.Done()
}

// Decoding reports whether the codec fills the struct (restore) rather
// than reading it (save).
func (c *Codec) Decoding() bool { return c.dec != nil }

// Fail records err while decoding (the first error sticks); walks use it
// for a value they check themselves.
func (c *Codec) Fail(err error) {
	if c.dec != nil {
		c.dec.Fail(err)
	}
}

func (c *Codec) U8(p *uint8) {
	if c.enc != nil {
		c.enc.U8(*p)
	} else {
		*p = c.dec.U8()
	}
}

func (c *Codec) U16(p *uint16) {
	if c.enc != nil {
		c.enc.U16(*p)
	} else {
		*p = c.dec.U16()
	}
}

func (c *Codec) U32(p *uint32) {
	if c.enc != nil {
		c.enc.U32(*p)
	} else {
		*p = c.dec.U32()
	}
}

func (c *Codec) U64(p *uint64) {
	if c.enc != nil {
		c.enc.U64(*p)
	} else {
		*p = c.dec.U64()
	}
}

func (c *Codec) Bool(p *bool) {
	if c.enc != nil {
		c.enc.Bool(*p)
	} else {
		*p = c.dec.Bool()
	}
}

// Bytes is a length-prefixed byte string of at most max bytes.
func (c *Codec) Bytes(p *[]byte, max int) {
	if c.enc != nil {
		c.enc.Blob(*p)
	} else {
		*p = c.dec.Blob(max)
	}
}

// String is a length-prefixed string of at most max bytes.
func (c *Codec) String(p *string, max int) {
	if c.enc != nil {
		c.enc.String(*p)
	} else {
		*p = c.dec.String(max)
	}
}

// Exact is a length-prefixed byte string that must be exactly len(p)
// bytes long (a kernel struct, say), read into p in place.
func (c *Codec) Exact(p []byte) {
	if c.enc != nil {
		c.enc.Blob(p)
		return
	}
	c.dec.exact(p)
}

// U32s is len(p) uint32s, without a length (the caller knows how many):
// one read of the input for all of them, where U32 for each reads it
// len(p) times (a CPUID entry's fields, say).
func (c *Codec) U32s(p []uint32) {
	if c.enc != nil {
		for _, v := range p {
			c.enc.U32(v)
		}
		return
	}
	c.dec.u32s(p)
}

// Fixed is a byte array of a fixed size, without a length.
func (c *Codec) Fixed(p []byte) {
	for i := range p {
		c.U8(&p[i])
	}
}

// Slice32 and Slice16 encode the length of *s as a uint32 or uint16;
// decoding, they check it against max (what names the elements in the
// error) and make *s that long (nil when 0). The caller then walks the
// elements.
func Slice32[T any](c *Codec, s *[]T, max int, what string) {
	n := uint32(len(*s))
	c.U32(&n)
	sized(c, s, uint64(n), max, what)
}

// Slice16: see Slice32.
func Slice16[T any](c *Codec, s *[]T, max int, what string) {
	n := uint16(len(*s))
	c.U16(&n)
	sized(c, s, uint64(n), max, what)
}

func sized[T any](c *Codec, s *[]T, n uint64, max int, what string) {
	if c.dec == nil {
		return
	}
	*s = nil
	if c.dec.Err() != nil || n == 0 {
		return
	}
	if n > uint64(max) {
		c.dec.Fail(fmt.Errorf("device state: %d %s, at most %d", n, what, max))
		return
	}
	*s = make([]T, n)
}
