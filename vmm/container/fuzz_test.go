package container

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

var sentinels = []error{ErrNotContainer, ErrVersion, ErrFormat, ErrTruncated, ErrChecksum, ErrTooLarge}

func sentinel(err error) error {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return s
		}
	}
	return nil
}

// FuzzParse feeds arbitrary bytes to both readers. They must never
// panic, must agree (the same sections, or a refusal of the same class),
// every refusal must wrap a sentinel, every section must respect its cap,
// and what they accept must be what a Writer writes for those sections.
func FuzzParse(f *testing.F) {
	f.Add(encode(f, "GOVMMTST", 3, testSections))
	f.Add(encode(f, "GOVMMTST", 2, nil))
	var ps PageSection
	ps.Add(0x1000, bytes.Repeat([]byte{1}, PageSize))
	ps.Add(0x2000, nil)
	f.Add(encode(f, "GOVMMTST", 2, []Section{{TypePages, ps.Payload()}, {TypeDisk, AppendDisk(nil, 1, 512, 3, []byte("abc"))}}))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, ss, err := Parse(data, testFormat)
		h2, ss2, err2 := readAll(data, testFormat)
		if sentinel(err) != sentinel(err2) {
			t.Fatalf("Parse says %v, Reader %v", err, err2)
		}
		if err != nil {
			if sentinel(err) == nil {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		if h != h2 || len(ss) != len(ss2) {
			t.Fatalf("Parse read %v %d sections, Reader %v %d", h, len(ss), h2, len(ss2))
		}
		for i, s := range ss {
			if s.Type != ss2[i].Type || !bytes.Equal(s.Payload, ss2[i].Payload) {
				t.Fatalf("section %d differs", i)
			}
			if len(s.Payload) > testFormat.Caps[s.Type] {
				t.Fatalf("accepted a %v section of %d bytes", s.Type, len(s.Payload))
			}
		}
		if again := encode(t, h.Magic, h.Version, ss); !bytes.Equal(again, data) {
			t.Fatalf("accepted bytes a Writer does not write")
		}
	})
}

// FuzzParsePages feeds arbitrary page section payloads to ParsePages: it
// must never panic, and what it accepts must be what a PageSection
// builds from those pages.
func FuzzParsePages(f *testing.F) {
	var ps PageSection
	ps.Add(0, bytes.Repeat([]byte{1}, PageSize))
	ps.Add(PageSize, nil)
	f.Add(bytes.Clone(ps.Payload()))
	f.Add([]byte{1, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0})
	f.Add(AppendGroupedSection(nil, []Page{{0, EncRaw, bytes.Repeat([]byte{1}, PageSize)}, {PageSize, EncZero, nil}}))
	f.Fuzz(func(t *testing.T, p []byte) {
		pages, err := ParsePages(p, nil)
		if err != nil {
			if sentinel(err) == nil {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		var s PageSection
		for _, pg := range pages {
			if pg.GPA%PageSize != 0 || (pg.Enc == EncRaw) != (len(pg.Data) == PageSize) || (pg.Enc == EncZero) != (pg.Data == nil) {
				t.Fatalf("accepted page %#x encoding %d with %d bytes", pg.GPA, pg.Enc, len(pg.Data))
			}
			s.Add(pg.GPA, pg.Data)
		}
		built := s.Payload()
		if binary.LittleEndian.Uint16(p[2:])&SectionGrouped != 0 {
			built = AppendGroupedSection(nil, pages)
		}
		if !bytes.Equal(built, p) {
			t.Fatalf("accepted bytes a PageSection (or AppendGroupedSection) does not build")
		}
	})
}
