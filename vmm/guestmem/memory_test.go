package guestmem

import (
	"bytes"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newTestMemory(t *testing.T) *Memory {
	t.Helper()
	m, err := New([]Spec{{GPA: 0, Size: 64 * PageSize}, {GPA: 0x100000, Size: 200 * PageSize}})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func TestNewRejectsBadLayouts(t *testing.T) {
	tests := []struct {
		name  string
		specs []Spec
	}{
		{"unaligned size", []Spec{{GPA: 0, Size: 100}}},
		{"unaligned address", []Spec{{GPA: 10, Size: PageSize}}},
		{"empty", []Spec{{GPA: 0, Size: 0}}},
		{"overlap", []Spec{{GPA: 0, Size: 2 * PageSize}, {GPA: PageSize, Size: PageSize}}},
		{"wraps", []Spec{{GPA: ^GPA(0) &^ (PageSize - 1), Size: 2 * PageSize}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.specs)
			assert.Error(t, err)
		})
	}
}

func TestAccessBounds(t *testing.T) {
	m := newTestMemory(t)
	tests := []struct {
		name string
		gpa  GPA
		n    uint64
		ok   bool
	}{
		{"start", 0, 8, true},
		{"end of first region", 64*PageSize - 8, 8, true},
		{"straddles first region end", 64*PageSize - 4, 8, false},
		{"in the hole", 0x80000, 1, false},
		{"second region", 0x100000, PageSize, true},
		{"past the end", 0x100000 + 200*PageSize, 1, false},
		{"huge length", 0, ^uint64(0), false},
		{"wrapping address", ^GPA(0), 2, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			buf := make([]byte, min(tt.n, 16))
			if tt.n > 16 {
				_, err := m.Slice(tt.gpa, tt.n)
				assert.Equal(t, tt.ok, err == nil)
				return
			}
			err := m.WriteAt(buf, tt.gpa)
			if tt.ok {
				assert.NoError(t, err)
			} else {
				assert.ErrorIs(t, err, ErrOutOfRange)
			}
			assert.Equal(t, tt.ok, m.ReadAt(buf, tt.gpa) == nil)
		})
	}
}

func TestWritesMarkDirty(t *testing.T) {
	m := newTestMemory(t)
	r := m.Regions()[1]
	require.NoError(t, m.WriteAt([]byte("hello"), 0x100000+3*PageSize+PageSize-2))                  // pages 3 and 4
	require.NoError(t, m.Fill(0x100000+63*PageSize, 3*PageSize, func([]byte) error { return nil })) // pages 63..65
	require.NoError(t, m.MarkDirty(0x100000+199*PageSize, 1))                                       // page 199
	assert.Equal(t, 6, r.VMMDirtyCount())

	bm := make([]uint64, r.BitmapWords())
	r.HarvestVMMDirty(bm)
	var got []uint64
	for p := uint64(0); p < r.Pages(); p++ {
		if bm[p/64]&(1<<(p%64)) != 0 {
			got = append(got, p)
		}
	}
	assert.Equal(t, []uint64{3, 4, 63, 64, 65, 199}, got)
	assert.Equal(t, 0, r.VMMDirtyCount(), "harvest clears")
	assert.Equal(t, 0, m.Regions()[0].VMMDirtyCount(), "other region untouched")

	buf := make([]byte, 5)
	require.NoError(t, m.ReadAt(buf, 0x100000+3*PageSize+PageSize-2))
	assert.Equal(t, "hello", string(buf))
}

// A harvest that runs while a device fills guest memory in place (a block
// read straight from the image) never reports the page with the fill
// half done unless a later harvest reports it again: whatever a harvester
// copied last, when it copied after each harvest that reported the page,
// is the complete content. With the mark taken before the write (the old
// WritableSlice), the harvest in the middle took the only mark and the
// page went out half-written for good.
func TestFillRacingHarvestLosesNothing(t *testing.T) {
	m := newTestMemory(t)
	r := m.Regions()[1]
	const gpa = 0x100000 + 7*PageSize
	var shipped []byte // what the harvester last copied of the page
	harvest := func() {
		bm := make([]uint64, r.BitmapWords())
		r.HarvestVMMDirty(bm)
		if bm[0]&(1<<7) != 0 {
			b, err := m.Slice(gpa, PageSize)
			require.NoError(t, err)
			shipped = bytes.Clone(b)
		}
	}
	want := bytes.Repeat([]byte{0xab}, PageSize)
	require.NoError(t, m.Fill(gpa, PageSize, func(dst []byte) error {
		copy(dst[:PageSize/2], want)
		harvest() // a pre-copy round's harvest, between two writes of the device
		copy(dst[PageSize/2:], want[PageSize/2:])
		return nil
	}))
	harvest()
	assert.Equal(t, want, shipped, "the page as last shipped")

	// A failed fill may have written part of the range: still marked.
	require.Error(t, m.Fill(gpa, PageSize, func(dst []byte) error {
		dst[0] = 1
		return errors.New("short read")
	}))
	harvest()
	assert.Equal(t, byte(1), shipped[0])
	assert.ErrorIs(t, m.Fill(r.End(), 1, func([]byte) error { return nil }), ErrOutOfRange)
}
