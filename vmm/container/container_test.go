package container

import (
	"bytes"
	"encoding/binary"
	"io"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var testFormat = Format{
	Magic:      "GOVMMTST",
	MinVersion: 2, MaxVersion: 3,
	Caps: map[Type]int{TypeState: 64, TypePages: MaxPagesPayload, TypeDisk: MaxDiskPayload},
}

var testSections = []Section{
	{TypeState, []byte("machine state")},
	{TypePages, nil}, // an empty payload is a section too
	{TypeDisk, bytes.Repeat([]byte{7}, 64)},
	{TypeState, []byte("second piece")},
}

func encode(t testing.TB, magic string, version uint16, sections []Section) []byte {
	t.Helper()
	var b bytes.Buffer
	w, err := NewWriter(&b, magic, version)
	require.NoError(t, err)
	for _, s := range sections {
		require.NoError(t, w.Section(s.Type, s.Payload))
	}
	require.NoError(t, w.Close())
	require.Equal(t, int64(b.Len()), w.Len())
	return b.Bytes()
}

// readAll reads data with a Reader, copying each payload.
func readAll(data []byte, f Format) (Header, []Section, error) {
	r, err := NewReader(bytes.NewReader(data), f)
	if err != nil {
		return Header{}, nil, err
	}
	var out []Section
	for {
		s, err := r.Next()
		if err == io.EOF {
			return r.Header(), out, nil
		}
		if err != nil {
			return r.Header(), nil, err
		}
		out = append(out, Section{s.Type, bytes.Clone(s.Payload)})
	}
}

func normalize(ss []Section) []Section {
	out := make([]Section, len(ss))
	for i, s := range ss {
		out[i] = Section{s.Type, append([]byte{}, s.Payload...)}
	}
	return out
}

func TestRoundTrip(t *testing.T) {
	data := encode(t, "GOVMMTST", 3, testSections)
	require.Len(t, data, HeaderSize+4*SectionHeaderSize+13+64+12+EndSize)
	require.Equal(t, "GOVMMTST\x03\x00\x00\x00", string(data[:HeaderSize]))

	h, got, err := Parse(data, testFormat)
	require.NoError(t, err)
	assert.Equal(t, Header{Magic: "GOVMMTST", Version: 3}, h)
	assert.Equal(t, normalize(testSections), normalize(got))

	h, got, err = readAll(data, testFormat)
	require.NoError(t, err)
	assert.Equal(t, Header{Magic: "GOVMMTST", Version: 3}, h)
	assert.Equal(t, normalize(testSections), normalize(got))

	// Header and end alone make a container.
	empty := encode(t, "GOVMMTST", 2, nil)
	require.Len(t, empty, HeaderSize+EndSize)
	_, got, err = Parse(empty, testFormat)
	require.NoError(t, err)
	assert.Empty(t, got)
}

// The end section carries the Checksum rule over everything before it:
// a sender that never writes the container whole (the stream) computes
// the same value section by section.
func TestChecksumRule(t *testing.T) {
	data := encode(t, "GOVMMTST", 3, testSections)
	sum := NewChecksum("GOVMMTST", 3)
	for _, s := range testSections {
		sum.Section(s.Type, s.Payload[:len(s.Payload)/2], s.Payload[len(s.Payload)/2:])
	}
	assert.Equal(t, binary.LittleEndian.Uint32(data[len(data)-4:]), sum.Sum32())
}

func TestRefusals(t *testing.T) {
	good := encode(t, "GOVMMTST", 3, testSections)
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	put16 := func(off int, v uint16) []byte {
		return mutate(func(b []byte) []byte { binary.LittleEndian.PutUint16(b[off:], v); return b })
	}
	put32 := func(off int, v uint32) []byte {
		return mutate(func(b []byte) []byte { binary.LittleEndian.PutUint32(b[off:], v); return b })
	}
	first := HeaderSize // the first section's header
	cases := []struct {
		name string
		data []byte
		want error
	}{
		{"empty", nil, ErrNotContainer},
		{"foreign", append([]byte("NOTGOVMM"), good[8:]...), ErrNotContainer},
		{"other kind", encode(t, MagicState, 3, testSections), ErrNotContainer},
		{"short header", good[:10], ErrTruncated},
		{"newer version", put16(8, 4), ErrVersion},
		{"older version", put16(8, 1), ErrVersion},
		{"header flags", put16(10, 1), ErrFormat},
		{"unknown section", put16(first, 99), ErrFormat},
		{"section flags", put16(first+2, 1), ErrFormat},
		{"over its cap", put32(first+4, 65), ErrTooLarge},
		{"huge length", put32(first+4, 0xffffffff), ErrTooLarge},
		{"end of 5 bytes", put32(len(good)-EndSize+4, 5), ErrFormat},
		{"truncated in a header", good[:first+3], ErrTruncated},
		{"truncated in a payload", good[:first+SectionHeaderSize+5], ErrTruncated},
		{"no end", good[:len(good)-EndSize], ErrTruncated},
		{"truncated in the end", good[:len(good)-1], ErrTruncated},
		{"flipped payload bit", mutate(func(b []byte) []byte { b[first+SectionHeaderSize] ^= 1; return b }), ErrChecksum},
		{"flipped crc bit", mutate(func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }), ErrChecksum},
		{"bytes after the end", append(bytes.Clone(good), 0), ErrFormat},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, ss, err := Parse(c.data, testFormat)
			assert.ErrorIs(t, err, c.want, "Parse")
			assert.Nil(t, ss, "Parse hands out nothing of a refused container")
			_, _, err = readAll(c.data, testFormat)
			assert.ErrorIs(t, err, c.want, "Reader")
		})
	}
}

// A section exactly at its cap is read; one byte over is refused before
// its payload is read, so a reader never allocates more than a cap.
func TestCaps(t *testing.T) {
	at := encode(t, "GOVMMTST", 2, []Section{{TypeState, make([]byte, 64)}})
	_, _, err := Parse(at, testFormat)
	require.NoError(t, err)
	_, _, err = readAll(at, testFormat)
	require.NoError(t, err)

	over := encode(t, "GOVMMTST", 2, []Section{{TypeState, make([]byte, 65)}})
	_, _, err = Parse(over, testFormat)
	require.ErrorIs(t, err, ErrTooLarge)
	r, err := NewReader(io.MultiReader(bytes.NewReader(over[:HeaderSize+SectionHeaderSize]), failingReader{t}), testFormat)
	require.NoError(t, err)
	_, err = r.Next()
	require.ErrorIs(t, err, ErrTooLarge)
	_, err = r.Next()
	require.ErrorIs(t, err, ErrTooLarge, "the error sticks")
}

// failingReader fails the test if anything reads from it.
type failingReader struct{ t *testing.T }

func (f failingReader) Read([]byte) (int, error) {
	f.t.Error("the payload of a section over its cap was read")
	return 0, io.EOF
}

func TestWriterRefusesMisuse(t *testing.T) {
	_, err := NewWriter(io.Discard, "SHORT", 1)
	require.Error(t, err)
	w, err := NewWriter(io.Discard, "GOVMMTST", 1)
	require.NoError(t, err)
	require.ErrorIs(t, w.Section(TypeEnd, []byte{0, 0, 0, 0}), ErrFormat)
	require.NoError(t, w.Close())
	require.ErrorIs(t, w.Section(TypeState, nil), ErrFormat, "nothing after the end")
}

func TestPageSection(t *testing.T) {
	raw := bytes.Repeat([]byte{0xab}, PageSize)
	var s PageSection
	require.Nil(t, s.Payload())
	s.Add(0x1000, raw)
	s.Add(0x7000, nil)
	s.Add(1<<32, raw)
	require.Equal(t, 3, s.Len())
	p := s.Payload()
	require.Len(t, p, 4+3*PageEntrySize+2*PageSize)
	pages, err := ParsePages(p, nil)
	require.NoError(t, err)
	require.Equal(t, []Page{{0x1000, EncRaw, raw}, {0x7000, EncZero, nil}, {1 << 32, EncRaw, raw}}, pages)

	s.Reset()
	s.Add(0x2000, nil)
	pages, err = ParsePages(s.Payload(), pages)
	require.NoError(t, err)
	require.Equal(t, []Page{{0x2000, EncZero, nil}}, pages)

	entry := func(gpa uint64, enc Encoding, reserved byte, n uint32, data []byte) []byte {
		b := binary.LittleEndian.AppendUint16(nil, 1)
		b = append(b, 0, 0)
		b = binary.LittleEndian.AppendUint64(b, gpa)
		b = append(b, byte(enc), reserved, 0, 0)
		b = binary.LittleEndian.AppendUint32(b, n)
		return append(b, data...)
	}
	full := func(n int) []byte {
		var s PageSection
		for i := range n {
			s.Add(uint64(i)*PageSize, nil)
		}
		b := s.Payload()
		binary.LittleEndian.PutUint16(b, uint16(n))
		return b
	}
	_, err = ParsePages(full(MaxPagesPerSection), nil)
	require.NoError(t, err, "a full section")
	bad := []struct {
		name string
		p    []byte
		want error
	}{
		{"short", []byte{1, 0}, ErrFormat},
		{"no pages", []byte{0, 0, 0, 0}, ErrTooLarge},
		{"too many pages", full(MaxPagesPerSection + 1), ErrTooLarge},
		{"unknown flags", append([]byte{1, 0, 2, 0}, entry(0, EncZero, 0, 0, nil)[4:]...), ErrFormat},
		{"reserved entry bytes", entry(0, EncZero, 1, 0, nil), ErrFormat},
		{"unaligned", entry(0x1001, EncZero, 0, 0, nil), ErrFormat},
		{"raw of 4095", entry(0, EncRaw, 0, PageSize-1, raw[1:]), ErrFormat},
		{"raw truncated", entry(0, EncRaw, 0, PageSize, raw[1:]), ErrFormat},
		{"zero with bytes", entry(0, EncZero, 0, 1, []byte{0}), ErrFormat},
		{"xor-rle", entry(0, EncXOR, 0, 2, []byte{9, 9}), ErrFormat},
		{"entry truncated", entry(0, EncZero, 0, 0, nil)[:10], ErrFormat},
		{"trailing", append(entry(0, EncZero, 0, 0, nil), 0), ErrFormat},
	}
	for _, c := range bad {
		_, err := ParsePages(c.p, nil)
		assert.ErrorIs(t, err, c.want, c.name)
	}
}

// A grouped section (SectionGrouped) holds the same pages as the
// interleaved one, its headers first and its data from a 64-byte
// boundary on; ParsePages reads both, and refuses a grouped one that is
// cut short, has bytes in its padding, too few or too many data bytes.
func TestPageSectionGrouped(t *testing.T) {
	raw := bytes.Repeat([]byte{0xab}, PageSize)
	other := bytes.Repeat([]byte{0x5c}, PageSize)
	want := []Page{{0x1000, EncRaw, raw}, {0x7000, EncZero, nil}, {1 << 32, EncRaw, other}}
	p := AppendGroupedSection(nil, want)
	require.Len(t, p, 64+2*PageSize, "4 + 3 headers, padded to 64, then two pages")
	require.Equal(t, 64, GroupedDataOffset(3))
	require.Equal(t, 4160, GroupedDataOffset(MaxPagesPerSection))
	require.Equal(t, 0, bytes.Compare(p[64:64+PageSize], raw), "data from the 64-byte boundary, in entry order")
	pages, err := ParsePages(p, nil)
	require.NoError(t, err)
	require.Equal(t, want, pages)
	pages, err = ParsePagesDeltas(p, nil)
	require.NoError(t, err)
	require.Equal(t, want, pages)

	// Four headers end at 68: the data starts at 128.
	four := append(want, Page{0x9000, EncZero, nil})
	q := AppendGroupedSection(nil, four)
	require.Len(t, q, 128+2*PageSize)
	pages, err = ParsePages(q, nil)
	require.NoError(t, err)
	require.Equal(t, four, pages)

	zeros := AppendGroupedSection(nil, []Page{{0, EncZero, nil}})
	require.Len(t, zeros, 64)
	_, err = ParsePages(zeros, nil)
	require.NoError(t, err, "only zero pages: headers and padding")

	padded := bytes.Clone(p)
	padded[60] = 1
	bad := []struct {
		name string
		p    []byte
	}{
		{"cut in the padding", zeros[:40]},
		{"cut in the headers", p[:30]},
		{"padding not zero", padded},
		{"data truncated", p[:len(p)-1]},
		{"trailing", append(bytes.Clone(p), 0)},
		{"raw of 4095", AppendGroupedSection(nil, []Page{{0, EncRaw, raw[1:]}})},
	}
	for _, c := range bad {
		_, err := ParsePages(c.p, nil)
		assert.ErrorIs(t, err, ErrFormat, c.name)
	}
}

// AddCopy makes the same section as Add with the zero test done by the
// caller: a raw entry for a page with any byte set, a zero entry, without
// bytes, for an all-zero one.
func TestPageSectionAddCopy(t *testing.T) {
	raw := bytes.Repeat([]byte{0xab}, PageSize)
	last := make([]byte, PageSize)
	last[PageSize-1] = 1
	var a, b PageSection
	a.Headroom, b.Headroom = 8, 8
	for i, p := range [][]byte{raw, make([]byte, PageSize), last, make([]byte, PageSize)} {
		zero := a.AddCopy(uint64(i)*PageSize, p)
		assert.Equal(t, i%2 == 1, zero, "page %d", i)
		if zero {
			p = nil
		}
		b.Add(uint64(i)*PageSize, p)
	}
	require.Equal(t, 4, a.Len())
	require.Equal(t, b.Framed(), a.Framed())
}

func TestDiskSection(t *testing.T) {
	w, err := ParseDisk(AppendDisk(nil, 3, 4096, 5, []byte("hello")))
	require.NoError(t, err)
	require.Equal(t, DiskWrite{Disk: 3, Off: 4096, Length: 5, Data: []byte("hello")}, w)
	w, err = ParseDisk(AppendDisk(nil, 0, 0, MaxDiskChunk, nil))
	require.NoError(t, err)
	require.Equal(t, DiskWrite{Length: MaxDiskChunk, Zero: true}, w)

	flags := AppendDisk(nil, 0, 0, 1, []byte{1})
	flags[2] = 2
	bad := map[string][]byte{
		"short":          {1, 2, 3},
		"unknown flags":  flags,
		"empty":          AppendDisk(nil, 0, 0, 0, []byte{}),
		"over the chunk": AppendDisk(nil, 0, 0, MaxDiskChunk+1, nil),
		"zero with data": append(AppendDisk(nil, 0, 0, 1, nil), 0),
		"data too short": AppendDisk(nil, 0, 0, 5, []byte("hell")),
		"data too long":  AppendDisk(nil, 0, 0, 3, []byte("hell")),
	}
	for name, p := range bad {
		_, err := ParseDisk(p)
		assert.ErrorIs(t, err, ErrFormat, name)
	}
}

// Copy entries (a page whose bytes the stream already shipped at some
// gpa) round-trip on a stream with deltas; a snapshot's parser refuses
// them, and a copy of the wrong length, cut short, or from an unaligned
// source is a format error.
func TestPageSectionCopyEntries(t *testing.T) {
	var s PageSection
	s.AddCopyOf(0x3000, 0xdeadbeef, 0x9000)
	s.Add(0x4000, nil)
	p := s.Payload()
	require.Len(t, p, 4+2*PageEntrySize+CopySize)
	pages, err := ParsePagesDeltas(p, nil)
	require.NoError(t, err)
	want := binary.LittleEndian.AppendUint32(nil, 0xdeadbeef)
	want = binary.LittleEndian.AppendUint64(want, 0x9000)
	require.Equal(t, []Page{{0x3000, EncCopy, want}, {0x4000, EncZero, nil}}, pages)
	_, err = ParsePages(p, nil)
	require.ErrorIs(t, err, ErrFormat, "a snapshot takes no copies")

	entry := func(n uint32, data []byte) []byte {
		b := []byte{1, 0, 0, 0}
		b = binary.LittleEndian.AppendUint64(b, 0x3000)
		b = append(b, byte(EncCopy), 0, 0, 0)
		b = binary.LittleEndian.AppendUint32(b, n)
		return append(b, data...)
	}
	unaligned := binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint32(nil, 1), 0x9001)
	for name, b := range map[string][]byte{
		"short length":     entry(CopySize-1, want[:CopySize-1]),
		"long length":      entry(CopySize+1, append(bytes.Clone(want), 0)),
		"truncated":        entry(CopySize, want[:CopySize-1]),
		"unaligned source": entry(CopySize, unaligned),
		"trailing":         append(entry(CopySize, want), 0),
	} {
		_, err := ParsePagesDeltas(b, nil)
		assert.ErrorIs(t, err, ErrFormat, name)
	}
}
