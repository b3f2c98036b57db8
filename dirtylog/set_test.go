package dirtylog

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

const pg = guestmem.PageSize

// twoRegions is a small memory with a gap and a region whose page count is
// not a multiple of 64, so that tail bits and region order matter.
func twoRegions(t *testing.T) *guestmem.Memory {
	t.Helper()
	mem, err := guestmem.New([]guestmem.Spec{
		{GPA: 0x100000000, Size: 100 * pg},
		{GPA: 0, Size: 130 * pg},
	})
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	return mem
}

func setOf(t *testing.T, mem *guestmem.Memory, gpas ...guestmem.GPA) *Set {
	t.Helper()
	s := NewSet(mem)
	for _, g := range gpas {
		require.True(t, s.add(g), "gpa %#x outside memory", uint64(g))
	}
	return s
}

// add puts the page holding gpa in s (tests only).
func (s *Set) add(gpa guestmem.GPA) bool {
	for i := range s.regions {
		r := &s.regions[i]
		if gpa >= r.gpa {
			if page := uint64(gpa-r.gpa) / pg; page < r.pages {
				r.bits[page/64] |= 1 << (page % 64)
				return true
			}
		}
	}
	return false
}

func collect(t *testing.T, s *Set) []guestmem.GPA {
	t.Helper()
	var out []guestmem.GPA
	require.NoError(t, s.ForEach(func(g guestmem.GPA) error { out = append(out, g); return nil }))
	return out
}

func TestSetEmpty(t *testing.T) {
	t.Parallel()
	s := NewSet(twoRegions(t))
	assert.Zero(t, s.Count())
	assert.Empty(t, collect(t, s))
	assert.False(t, s.Contains(0))
}

func TestSetForEachAscendingAcrossRegionsAndWords(t *testing.T) {
	t.Parallel()
	mem := twoRegions(t)
	want := []guestmem.GPA{0, 63 * pg, 64 * pg, 129 * pg, 0x100000000, 0x100000000 + 99*pg}
	// Added out of order: ForEach sorts by address, not by insertion.
	s := setOf(t, mem, want[5], want[3], want[0], want[4], want[2], want[1])
	assert.Equal(t, want, collect(t, s))
	assert.Equal(t, len(want), s.Count())
}

func TestSetContains(t *testing.T) {
	t.Parallel()
	mem := twoRegions(t)
	s := setOf(t, mem, 5*pg, 0x100000000+64*pg)
	tests := []struct {
		name string
		gpa  guestmem.GPA
		want bool
	}{
		{"page start", 5 * pg, true},
		{"inside the page", 5*pg + 123, true},
		{"next page", 6 * pg, false},
		{"second region", 0x100000000 + 64*pg + 4095, true},
		{"gap between regions", 0x80000000, false},
		{"past the first region's last page", 130 * pg, false},
		{"past the end of memory", 0x100000000 + 100*pg, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, s.Contains(tt.gpa))
		})
	}
}

func TestSetOr(t *testing.T) {
	t.Parallel()
	mem := twoRegions(t)
	a := setOf(t, mem, 1*pg, 70*pg)
	b := setOf(t, mem, 70*pg, 0x100000000)
	a.Or(b)
	assert.Equal(t, []guestmem.GPA{1 * pg, 70 * pg, 0x100000000}, collect(t, a))
	assert.Equal(t, []guestmem.GPA{70 * pg, 0x100000000}, collect(t, b), "Or changes only its receiver")
	a.Or(nil)
	assert.Equal(t, 3, a.Count())
}

func TestSetOrDifferentLayoutPanics(t *testing.T) {
	t.Parallel()
	other, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: 130 * pg}})
	require.NoError(t, err)
	defer other.Close()
	assert.Panics(t, func() { NewSet(twoRegions(t)).Or(NewSet(other)) })
}

func TestFullSet(t *testing.T) {
	t.Parallel()
	mem := twoRegions(t)
	s := NewFullSet(mem)
	require.Equal(t, 230, s.Count(), "every page and no tail bit")
	got := collect(t, s)
	require.Len(t, got, 230)
	assert.Equal(t, guestmem.GPA(0), got[0])
	assert.Equal(t, guestmem.GPA(129*pg), got[129])
	assert.Equal(t, guestmem.GPA(0x100000000), got[130])
	assert.Equal(t, guestmem.GPA(0x100000000+99*pg), got[229])
	assert.True(t, s.Contains(129*pg))
	assert.False(t, s.Contains(130*pg))
}

func TestSetForEachStopsAtError(t *testing.T) {
	t.Parallel()
	s := setOf(t, twoRegions(t), 1*pg, 2*pg, 3*pg)
	stop := errors.New("stop")
	var seen []guestmem.GPA
	err := s.ForEach(func(g guestmem.GPA) error {
		seen = append(seen, g)
		if g == 2*pg {
			return stop
		}
		return nil
	})
	assert.ErrorIs(t, err, stop)
	assert.Equal(t, []guestmem.GPA{1 * pg, 2 * pg}, seen)
}

// A source that sets bits past a region's last page (KVM never should) does
// not make pages appear that do not exist.
func TestSetMaskTail(t *testing.T) {
	t.Parallel()
	s := NewSet(twoRegions(t))
	s.regions[0].bits[2] = ^uint64(0) // pages 128..191 of a 130-page region
	s.regions[0].maskTail()
	assert.Equal(t, []guestmem.GPA{128 * pg, 129 * pg}, collect(t, s))
}
