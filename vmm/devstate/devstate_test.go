package devstate

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRoundTrip(t *testing.T) {
	var e Encoder
	e.U8(7)
	e.U16(0xbeef)
	e.U32(0xdeadbeef)
	e.U64(1 << 40)
	e.Bool(true)
	e.Blob([]byte{1, 2, 3})
	e.String("virtio-net0")

	d := NewDecoder(e.Bytes())
	assert.Equal(t, uint8(7), d.U8())
	assert.Equal(t, uint16(0xbeef), d.U16())
	assert.Equal(t, uint32(0xdeadbeef), d.U32())
	assert.Equal(t, uint64(1<<40), d.U64())
	assert.True(t, d.Bool())
	assert.Equal(t, []byte{1, 2, 3}, d.Blob(16))
	assert.Equal(t, "virtio-net0", d.String(64))
	require.NoError(t, d.Done())
}

func TestDecoderRejects(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		read func(d *Decoder)
	}{
		{"short u32", []byte{1, 2}, func(d *Decoder) { d.U32() }},
		{"blob longer than data", []byte{10, 0, 0, 0, 1}, func(d *Decoder) { d.Blob(100) }},
		{"blob over cap", []byte{0xff, 0xff, 0xff, 0x7f}, func(d *Decoder) { d.Blob(100) }},
		{"bad bool", []byte{2}, func(d *Decoder) { d.Bool() }},
		{"trailing bytes", []byte{1, 2}, func(d *Decoder) { d.U8() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := NewDecoder(tt.in)
			tt.read(d)
			assert.Error(t, d.Done())
		})
	}
}

type codecSample struct {
	A     uint8
	B     uint16
	C     uint32
	D     uint64
	E     bool
	Blob  []byte
	Fixed [3]byte
	Items []uint32
	Short []uint64
}

func (s *codecSample) walk(c *Codec) {
	c.U8(&s.A)
	c.U16(&s.B)
	c.U32(&s.C)
	c.U64(&s.D)
	c.Bool(&s.E)
	c.Bytes(&s.Blob, 8)
	c.Fixed(s.Fixed[:])
	Slice32(c, &s.Items, 4, "items")
	for i := range s.Items {
		c.U32(&s.Items[i])
	}
	Slice16(c, &s.Short, 2, "shorts")
	for i := range s.Short {
		c.U64(&s.Short[i])
	}
}

// One walk encodes and decodes: the round trip is the identity, and the
// encoding is the Encoder's layout.
func TestCodecRoundTrip(t *testing.T) {
	in := codecSample{A: 1, B: 2, C: 3, D: 4, E: true, Blob: []byte("ab"), Fixed: [3]byte{7, 8, 9},
		Items: []uint32{5, 6}, Short: []uint64{1 << 40}}
	b := Encode(in.walk)
	var e Encoder
	e.U8(1)
	e.U16(2)
	e.U32(3)
	e.U64(4)
	e.Bool(true)
	e.Blob([]byte("ab"))
	e.U8(7)
	e.U8(8)
	e.U8(9)
	e.U32(2)
	e.U32(5)
	e.U32(6)
	e.U16(1)
	e.U64(1 << 40)
	assert.Equal(t, e.Bytes(), b)
	var out codecSample
	require.NoError(t, Decode(b, out.walk))
	assert.Equal(t, in, out)
}

func TestCodecRejects(t *testing.T) {
	good := codecSample{Items: []uint32{1, 2, 3, 4}}
	over := codecSample{Items: []uint32{1, 2, 3, 4, 5}}
	blob := codecSample{Blob: make([]byte, 9)}
	for name, b := range map[string][]byte{
		"too many elements": Encode(over.walk),
		"blob over cap":     Encode(blob.walk),
		"truncated":         Encode(good.walk)[:20],
		"trailing":          append(Encode(good.walk), 0),
	} {
		t.Run(name, func(t *testing.T) {
			var out codecSample
			assert.Error(t, Decode(b, out.walk))
		})
	}
}

// TestCodecExactAndU32s checks the two fields that decode in one read of
// the input: Exact (a kernel struct, copied into place) and U32s (a run
// of uint32s without a length), their encoding and their refusals.
func TestCodecExactAndU32s(t *testing.T) {
	type fixed struct {
		raw   [6]byte
		words [3]uint32
	}
	walk := func(s *fixed) func(*Codec) {
		return func(c *Codec) {
			c.Exact(s.raw[:])
			c.U32s(s.words[:])
		}
	}
	in := fixed{raw: [6]byte{1, 2, 3, 4, 5, 6}, words: [3]uint32{7, 1 << 20, 0xffffffff}}
	b := Encode(walk(&in))
	var e Encoder
	e.Blob(in.raw[:])
	for _, w := range in.words {
		e.U32(w)
	}
	assert.Equal(t, e.Bytes(), b)
	var out fixed
	require.NoError(t, Decode(b, walk(&out)))
	assert.Equal(t, in, out)

	var short Encoder // a struct of 5 bytes where 6 are wanted
	short.Blob(in.raw[:5])
	for _, w := range in.words {
		short.U32(w)
	}
	for name, data := range map[string][]byte{
		"struct of another size": short.Bytes(),
		"words cut short":        b[:len(b)-1],
		"struct cut short":       b[:7],
	} {
		t.Run(name, func(t *testing.T) {
			out := fixed{words: [3]uint32{9, 9, 9}}
			assert.Error(t, Decode(data, walk(&out)))
			if name == "words cut short" {
				assert.Equal(t, [3]uint32{}, out.words, "words read as zero after an error")
			}
		})
	}
}
