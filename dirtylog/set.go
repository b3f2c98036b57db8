package dirtylog

import (
	"fmt"
	"math/bits"

	"govmm/vmm/guestmem"
)

// Set is a set of guest pages: one bitmap per region of guest memory, one
// bit per page, 64 pages per word, in the regions' address order (the
// layout of KVM_GET_DIRTY_LOG). Sets made for the same Memory have the
// same layout and can be combined with Or.
//
// A Set is not safe for concurrent mutation.
type Set struct {
	regions []setRegion // sorted by GPA, as guestmem.Memory.Regions
}

type setRegion struct {
	gpa   guestmem.GPA
	pages uint64
	bits  []uint64 // (pages+63)/64 words; bits at and above pages are zero
}

// NewSet returns an empty set with mem's layout.
func NewSet(mem *guestmem.Memory) *Set {
	s := &Set{regions: make([]setRegion, len(mem.Regions()))}
	for i, r := range mem.Regions() {
		s.regions[i] = setRegion{gpa: r.GPA, pages: r.Pages(), bits: make([]uint64, r.BitmapWords())}
	}
	return s
}

// NewFullSet returns the set of every page of mem, for the first pre-copy
// round, which must send everything.
func NewFullSet(mem *guestmem.Memory) *Set {
	s := NewSet(mem)
	for i := range s.regions {
		r := &s.regions[i]
		for w := range r.bits {
			r.bits[w] = ^uint64(0)
		}
		r.maskTail()
	}
	return s
}

// maskTail clears the bits past the region's last page, so that Count and
// ForEach never see pages that do not exist whatever the source filled in.
func (r *setRegion) maskTail() {
	if rem := r.pages % 64; rem != 0 && len(r.bits) > 0 {
		r.bits[len(r.bits)-1] &= (uint64(1) << rem) - 1
	}
}

// Count is the number of pages in the set.
func (s *Set) Count() int {
	n := 0
	for _, r := range s.regions {
		for _, w := range r.bits {
			n += bits.OnesCount64(w)
		}
	}
	return n
}

// ForEach calls fn with the address of each page in the set, in ascending
// order, and stops at the first error, which it returns.
func (s *Set) ForEach(fn func(gpa guestmem.GPA) error) error {
	for _, r := range s.regions {
		for i, w := range r.bits {
			for w != 0 {
				b := bits.TrailingZeros64(w)
				w &= w - 1
				page := uint64(i)*64 + uint64(b)
				if err := fn(r.gpa + guestmem.GPA(page<<guestmem.PageShift)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Contains reports whether the page holding gpa is in the set. An address
// outside guest memory is in no set.
func (s *Set) Contains(gpa guestmem.GPA) bool {
	for _, r := range s.regions {
		if gpa < r.gpa {
			return false
		}
		page := uint64(gpa-r.gpa) >> guestmem.PageShift
		if page < r.pages {
			return r.bits[page/64]&(1<<(page%64)) != 0
		}
	}
	return false
}

// Or adds every page of other to s. Both must have the same layout (made
// for the same Memory); mixing layouts is a programming error and panics.
func (s *Set) Or(other *Set) {
	if other == nil {
		return
	}
	if !s.sameLayout(other) {
		panic(fmt.Sprintf("dirtylog: Or of sets with different layouts (%d and %d regions)",
			len(s.regions), len(other.regions)))
	}
	for i := range s.regions {
		dst, src := s.regions[i].bits, other.regions[i].bits
		for w := range dst {
			dst[w] |= src[w]
		}
	}
}

func (s *Set) sameLayout(o *Set) bool {
	if len(s.regions) != len(o.regions) {
		return false
	}
	for i := range s.regions {
		if s.regions[i].gpa != o.regions[i].gpa || s.regions[i].pages != o.regions[i].pages {
			return false
		}
	}
	return true
}

// Words returns region i's bitmap (in guestmem.Memory.Regions order), 64
// pages per word; shared, not to be modified. For code that works a word
// at a time (guestmem's copy-on-write snapshots).
func (s *Set) Words(i int) []uint64 { return s.regions[i].bits }
