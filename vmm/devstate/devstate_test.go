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
