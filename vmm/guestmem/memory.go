package guestmem

import (
	"errors"
	"fmt"
	"math/bits"
	"sort"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// PageSize is the granularity of dirty tracking and of KVM memory slots.
const PageSize = 4096

// PageShift is log2(PageSize).
const PageShift = 12

// GPA is a guest-physical address.
type GPA uint64

// ErrOutOfRange is returned for an access that is not wholly inside one
// region of guest RAM.
var ErrOutOfRange = errors.New("guest address out of range")

// RangeError says which access was out of range.
type RangeError struct {
	GPA GPA
	Len uint64
}

func (e *RangeError) Error() string {
	return fmt.Sprintf("guest range %#x+%#x: %v", uint64(e.GPA), e.Len, ErrOutOfRange)
}

// Unwrap returns ErrOutOfRange.
func (e *RangeError) Unwrap() error { return ErrOutOfRange }

// Region is one contiguous stretch of guest RAM: a KVM memory slot.
type Region struct {
	Slot uint32
	GPA  GPA
	Size uint64
	Host []byte // the host mapping, len == Size

	// dirty has one bit per page written by the VMM since the last Harvest.
	dirty []atomic.Uint64
}

// Pages is the number of pages in the region.
func (r *Region) Pages() uint64 { return r.Size / PageSize }

// End is the first address after the region.
func (r *Region) End() GPA { return r.GPA + GPA(r.Size) }

// Spec describes one region to create.
type Spec struct {
	GPA  GPA
	Size uint64
}

// Memory is the guest's RAM.
type Memory struct {
	regions []*Region // sorted by GPA, non-overlapping
	size    uint64
	// wp is the Protector while it has pages armed or a snapshot in
	// progress (snap): the VMM's own writes make their pages writable
	// first (copying what the snapshot still needs).
	wp   atomic.Pointer[Protector]
	snap atomic.Pointer[Snapshot]
	// writing is held (read) by each VMM write (WriteAt, Fill) from its
	// look at wp to its last byte, and (write) by the Protector around
	// each write-protection it applies (Arm, Begin): a page is never
	// protected between the write's making it writable and the write, so
	// the VMM's own writes never fault (see cow.go: why they must not).
	writing sync.RWMutex
}

// New maps anonymous memory for each region. Sizes and addresses must be
// page-aligned and regions must not overlap.
func New(specs []Spec) (*Memory, error) {
	specs = append([]Spec(nil), specs...)
	sort.Slice(specs, func(i, j int) bool { return specs[i].GPA < specs[j].GPA })
	m := &Memory{}
	ok := false
	defer func() {
		if !ok {
			m.Close()
		}
	}()
	for i, s := range specs {
		if s.Size == 0 || s.Size%PageSize != 0 || uint64(s.GPA)%PageSize != 0 {
			return nil, fmt.Errorf("guest memory region %#x+%#x: not page-aligned", uint64(s.GPA), s.Size)
		}
		if s.GPA+GPA(s.Size) < s.GPA {
			return nil, fmt.Errorf("guest memory region %#x+%#x: wraps", uint64(s.GPA), s.Size)
		}
		if i > 0 && s.GPA < m.regions[i-1].End() {
			return nil, fmt.Errorf("guest memory region %#x overlaps the one before", uint64(s.GPA))
		}
		host, err := unix.Mmap(-1, 0, int(s.Size), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			return nil, fmt.Errorf("map %d MiB of guest memory: %w", s.Size>>20, err)
		}
		// Sharing with fork children is never wanted, and transparent huge
		// pages only help when dirty logging is off; leave the kernel's default.
		_ = unix.Madvise(host, unix.MADV_DONTFORK)
		pages := s.Size / PageSize
		m.regions = append(m.regions, &Region{
			Slot:  uint32(i),
			GPA:   s.GPA,
			Size:  s.Size,
			Host:  host,
			dirty: make([]atomic.Uint64, (pages+63)/64),
		})
		m.size += s.Size
	}
	ok = true
	return m, nil
}

// Close unmaps all regions. It is idempotent; the Memory must not be used
// afterwards (and no VM may still map it).
func (m *Memory) Close() error {
	var first error
	for _, r := range m.regions {
		if r.Host != nil {
			if err := unix.Munmap(r.Host); err != nil && first == nil {
				first = err
			}
			r.Host = nil
		}
	}
	return first
}

// Regions returns the regions in address order. The slice is shared; do not
// modify it.
func (m *Memory) Regions() []*Region { return m.regions }

// Size is the total RAM in bytes.
func (m *Memory) Size() uint64 { return m.size }

// Specs returns the layout, to create an identical Memory elsewhere.
func (m *Memory) Specs() []Spec {
	out := make([]Spec, len(m.regions))
	for i, r := range m.regions {
		out[i] = Spec{GPA: r.GPA, Size: r.Size}
	}
	return out
}

// find returns the region holding [gpa, gpa+n) and the offset in it.
func (m *Memory) find(gpa GPA, n uint64) (*Region, uint64, error) {
	for _, r := range m.regions {
		if gpa >= r.GPA && gpa < r.End() {
			off := uint64(gpa - r.GPA)
			if n > r.Size-off {
				break
			}
			return r, off, nil
		}
	}
	return nil, 0, &RangeError{GPA: gpa, Len: n}
}

// Contains reports whether [gpa, gpa+n) lies inside one region.
func (m *Memory) Contains(gpa GPA, n uint64) bool {
	_, _, err := m.find(gpa, n)
	return err == nil
}

// Slice returns the host bytes backing [gpa, gpa+n) for reading. The range
// must lie inside one region. Do not write through it: use WriteAt or
// Fill, which record the dirty pages.
func (m *Memory) Slice(gpa GPA, n uint64) ([]byte, error) {
	r, off, err := m.find(gpa, n)
	if err != nil {
		return nil, err
	}
	return r.Host[off : off+n : off+n], nil
}

// Fill lets fill write [gpa, gpa+n) of guest memory in place, for a
// device that fills guest memory directly (a block read straight from the
// image), and marks the pages dirty once fill has returned, whether it
// succeeded or not (it may have written part of the range). The mark
// follows the writes, as in WriteAt: a harvest that runs while fill writes
// does not take the mark away before the bytes are in place, so the pages
// are reported by a harvest that reads them complete. Marking first would
// let a harvest between the mark and the last write report the pages, its
// caller ship them half-written, and nothing mark them again. dst is valid
// only during fill.
func (m *Memory) Fill(gpa GPA, n uint64, fill func(dst []byte) error) error {
	r, off, err := m.find(gpa, n)
	if err != nil {
		return err
	}
	m.writing.RLock()
	defer m.writing.RUnlock()
	if p := m.wp.Load(); p != nil {
		p.beforeWrite(r, off, n)
	}
	defer r.markDirty(off, n)
	return fill(r.Host[off : off+n : off+n])
}

// ReadAt copies guest memory at gpa into p.
func (m *Memory) ReadAt(p []byte, gpa GPA) error {
	s, err := m.Slice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, s)
	return nil
}

// WriteAt copies p into guest memory at gpa and marks the pages dirty. The
// mark follows the copy, so a harvest racing with it reports the pages
// either with the new bytes already in place or again at the next harvest.
func (m *Memory) WriteAt(p []byte, gpa GPA) error { return m.write(p, gpa, false) }

// WriteAtNT is WriteAt for bytes that nothing will read soon, such as a
// standby's copy of a committed checkpoint into the replica's memory:
// whole 64-byte blocks are written with non-temporal stores (copyNT),
// which neither read the old lines into the cache first nor evict
// anything for them. Pages scattered over guest memory went in 0.53-0.61
// of WriteAt's time on this project's host, consecutive ones in 1.07 of
// it (BenchmarkWriteAtNT); a guest that soon reads what was written
// would find it out of cache, so devices use WriteAt.
func (m *Memory) WriteAtNT(p []byte, gpa GPA) error { return m.write(p, gpa, true) }

// copyNT is copyNTUnfenced (ntcopy_unsafe.go, or a plain copy where
// there is no non-temporal copy), then the fence.
func copyNT(dst, src []byte) {
	copyNTUnfenced(dst, src)
	ntFence()
}

// NTWriter is WriteAtNT for many writes in a row from one goroutine, such
// as a standby's copy of a committed checkpoint into memory. After each
// write WriteAtNT fences its non-temporal stores and takes and releases
// locks, and each of those waits for the stores to drain: on this
// project's host that cost ~90 ns a page, a third of a page's copy.
// An NTWriter holds Memory's write lock (read: write protection waits)
// from its first write until Flush, which it calls itself every ntBatch
// writes, and fences the stores and marks their pages dirty once, at
// Flush. Until Flush returns, nothing outside the writing goroutine may
// rely on what was written (it reads it back in order itself), and the
// pages are not marked. Call Flush when done, whatever happened: an
// NTWriter left unflushed holds the lock.
type NTWriter struct {
	m      *Memory
	locked bool
	marks  []ntMark // the writes since the last Flush
}

type ntMark struct {
	r      *Region
	off, n uint64
}

// ntBatch is the most writes an NTWriter holds the lock across (64
// pages: 256 KiB).
const ntBatch = 64

// NTWriter starts a run of non-temporal writes into m.
func (m *Memory) NTWriter() *NTWriter { return &NTWriter{m: m} }

// WriteAt is WriteAtNT, its stores fenced and its pages marked at the
// next Flush.
func (w *NTWriter) WriteAt(p []byte, gpa GPA) error {
	r, off, err := w.m.find(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	if !w.locked {
		w.m.writing.RLock()
		w.locked = true
	}
	if wp := w.m.wp.Load(); wp != nil {
		wp.beforeWrite(r, off, uint64(len(p)))
	}
	copyNTUnfenced(r.Host[off:off+uint64(len(p))], p)
	w.marks = append(w.marks, ntMark{r, off, uint64(len(p))})
	if len(w.marks) >= ntBatch {
		w.Flush()
	}
	return nil
}

// Flush fences the writes since the last Flush, releases the lock and
// marks their pages dirty (after the bytes are in place, as WriteAt
// does).
func (w *NTWriter) Flush() {
	if !w.locked {
		return
	}
	ntFence()
	w.m.writing.RUnlock()
	w.locked = false
	for _, k := range w.marks {
		k.r.markDirty(k.off, k.n)
	}
	w.marks = w.marks[:0]
}

func (m *Memory) write(p []byte, gpa GPA, nt bool) error {
	r, off, err := m.find(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	m.writing.RLock()
	if wp := m.wp.Load(); wp != nil {
		wp.beforeWrite(r, off, uint64(len(p)))
	}
	if nt {
		copyNT(r.Host[off:off+uint64(len(p))], p)
	} else {
		copy(r.Host[off:], p)
	}
	m.writing.RUnlock()
	r.markDirty(off, uint64(len(p)))
	return nil
}

// MarkDirty records that [gpa, gpa+n) was written by the VMM.
func (m *Memory) MarkDirty(gpa GPA, n uint64) error {
	r, off, err := m.find(gpa, n)
	if err != nil {
		return err
	}
	r.markDirty(off, n)
	return nil
}

func (r *Region) markDirty(off, n uint64) {
	if n == 0 {
		return
	}
	first := off >> PageShift
	last := (off + n - 1) >> PageShift
	for p := first; p <= last; {
		w := p / 64
		lo := p % 64
		hi := uint64(63)
		if last/64 == w {
			hi = last % 64
		}
		mask := (^uint64(0) >> (63 - hi)) &^ ((uint64(1) << lo) - 1)
		word := &r.dirty[w]
		if word.Load()&mask != mask {
			word.Or(mask)
		}
		p = (w + 1) * 64
	}
}

// HarvestVMMDirty ORs the region's VMM dirty bitmap into bitmap (one bit per
// page, 64 pages per word) and clears it. The exchange is atomic per word,
// so a concurrent write is reported either now or at the next harvest.
func (r *Region) HarvestVMMDirty(bitmap []uint64) {
	for i := range r.dirty {
		if i >= len(bitmap) {
			return
		}
		if r.dirty[i].Load() != 0 {
			bitmap[i] |= r.dirty[i].Swap(0)
		}
	}
}

// VMMDirtyCount is the number of pages of the region marked dirty by the
// VMM and not yet harvested.
func (r *Region) VMMDirtyCount() int {
	n := 0
	for i := range r.dirty {
		n += bits.OnesCount64(r.dirty[i].Load())
	}
	return n
}

// BitmapWords is the number of uint64 words a dirty bitmap of r needs.
func (r *Region) BitmapWords() int { return len(r.dirty) }
