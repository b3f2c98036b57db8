package dirtylog

import (
	"errors"
	"fmt"
	"sync"

	"govmm/vmm/guestmem"
)

// ErrClosed is returned by Harvest on a closed Tracker.
var ErrClosed = errors.New("dirty tracker closed")

// clearChunk bounds the pages one KVM_CLEAR_DIRTY_LOG covers: num_pages is
// 32 bits, and every chunk but the last must be a multiple of 64.
const clearChunk = 1 << 30

// Options choose how the Tracker talks to KVM.
type Options struct {
	// ManualProtect uses KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when KVM has it:
	// KVM_GET_DIRTY_LOG then only reads the bitmap, and the Tracker
	// re-protects exactly the pages it got with KVM_CLEAR_DIRTY_LOG. When
	// KVM lacks it the Tracker falls back to plain KVM_GET_DIRTY_LOG;
	// Tracker.ManualProtect says which is in effect.
	ManualProtect bool
}

// Logging says how KVM reports the pages vCPUs write while a Tracker is
// open: the VM's dirty rings, or the slots' bitmaps, with or without
// manual protection.
type Logging struct {
	Ring          bool // Slots.ReapRings; KVM refuses the bitmap calls
	ManualProtect bool // bitmaps read by DirtyLog, re-armed by ClearDirtyLog
}

// Slots is the KVM side of dirty tracking for one VM: the dirty logging
// flag of its memory slots, and either their bitmaps or the vCPUs' dirty
// rings, as the VM was built. The machine that owns the VM provides it
// (vmm.Machine.TrackDirty), so that only package vmm holds the VM's file
// descriptor; slot numbers are guestmem.Region.Slot.
type Slots interface {
	// StartLogging turns KVM dirty logging on for every slot (first
	// enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when manualProtect is
	// asked, the VM uses bitmaps and KVM has it, so that no bitmap is
	// ever read in the other mode) and reports what is in effect. On
	// failure logging is left off.
	StartLogging(manualProtect bool) (Logging, error)
	// StopLogging turns dirty logging (and manual protection) off again.
	StopLogging() error
	// DirtyLog copies the slot's dirty bitmap (KVM_GET_DIRTY_LOG).
	DirtyLog(slot uint32, bitmap []uint64) error
	// ClearDirtyLog re-protects the n pages from first whose bits are set
	// in bitmap (KVM_CLEAR_DIRTY_LOG).
	ClearDirtyLog(slot uint32, first uint64, n uint32, bitmap []uint64) error
	// ReapRings calls add with every page the vCPUs' dirty rings reported
	// since the last call (including the ones reaped while a vCPU waited
	// on a full ring) and re-arms them (KVM_RESET_DIRTY_RINGS) before it
	// returns. Only with Logging.Ring.
	ReapRings(add func(slot uint32, page uint64)) error
}

// Tracker collects the pages of one VM's memory written since the last
// Harvest, by vCPUs (KVM's dirty log) and by the VMM (guestmem's bitmap).
// While it is open it owns the dirty logging of every slot.
type Tracker struct {
	slots   Slots
	mem     *guestmem.Memory
	logging Logging
	slotIdx []int // slot number to index in mem.Regions(), -1 for none

	mu     sync.Mutex // mu serialises Harvest and Close; it guards closed
	closed bool
}

// New turns on KVM dirty logging for every memory slot of mem (which must
// be the memory registered in the VM behind slots, slot for slot) and
// starts from "everything clean": the first KVM bitmaps and the VMM's
// bitmap are harvested and discarded. Pages written before New returns may
// therefore be missing from every Harvest; send all of memory once
// (NewFullSet), reading it after New returns.
//
// New may be called while vCPUs run. On failure it leaves logging off.
// Callers outside tests use vmm.Machine.TrackDirty.
func New(slots Slots, mem *guestmem.Memory, opts Options) (*Tracker, error) {
	for _, r := range mem.Regions() {
		if len(r.Host) == 0 {
			return nil, fmt.Errorf("memory slot %d: guest memory is unmapped", r.Slot)
		}
	}
	t := &Tracker{slots: slots, mem: mem}
	for i, r := range mem.Regions() {
		for uint32(len(t.slotIdx)) <= r.Slot {
			t.slotIdx = append(t.slotIdx, -1)
		}
		t.slotIdx[r.Slot] = i
	}
	logging, err := slots.StartLogging(opts.ManualProtect)
	if err != nil {
		return nil, err
	}
	t.logging = logging
	if _, err := t.harvest(); err != nil {
		_ = t.Close()
		return nil, fmt.Errorf("discard the first dirty log: %w", err)
	}
	return t, nil
}

// ManualProtect reports whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is in
// use (it was asked for, the VM uses bitmaps and KVM has it).
func (t *Tracker) ManualProtect() bool { return t.logging.ManualProtect }

// Source names where KVM's half of each harvest comes from: "ring" (the
// vCPUs' dirty rings) or "bitmap" (each slot's dirty bitmap).
func (t *Tracker) Source() string {
	if t.logging.Ring {
		return "ring"
	}
	return "bitmap"
}

// Harvest returns the pages written since the previous Harvest (or New):
// KVM's dirty log (each slot's bitmap, or the vCPUs' rings) ORed with the
// pages the VMM marked.
//
// With every vCPU paused and devices quiesced it is a consistent cut. It
// may also run while vCPUs run (a pre-copy round); then it is a
// best-effort snapshot, and a page written during Harvest is reported by
// this harvest or the next one, never lost, as long as the caller reads
// page contents only after Harvest returns. Why, per slot:
//
//   - Plain KVM_GET_DIRTY_LOG: under the MMU lock, KVM swaps each word of
//     its bitmap with zero, write-protects the pages whose bits it took and
//     flushes the TLBs before returning. A write after the swap either
//     faults on the protection and sets a fresh bit (next harvest), or
//     lands before the flush on a page that this harvest reports anyway.
//   - Manual protect: KVM_GET_DIRTY_LOG only copies the bitmap; then
//     KVM_CLEAR_DIRTY_LOG, given that copy, clears those bits (an atomic
//     and-not), write-protects their pages and flushes the TLBs. A bit
//     set between the two calls is not in the copy, so it survives for
//     the next harvest; a page whose bit is cleared is in this harvest,
//     so a write that slips in before the protection is in place is
//     still read by the caller's copy. The VMM's bits are ORed in only
//     after the clear: KVM never logged those pages, and protecting them
//     would be wasted work.
//   - Rings: KVM pushes a page when a vCPU first writes it after it was
//     armed, and re-arms only entries collected and handed back, with
//     KVM_RESET_DIRTY_RINGS, which ReapRings calls after collecting: a
//     write before the reset is read by the caller's copy, one after it
//     faults and is pushed again (reapRings).
//   - VMM writes: guestmem copies first and marks after, and the harvest
//     swaps each word with zero, so a mark lands in this harvest (with the
//     bytes already in place) or the next.
func (t *Tracker) Harvest() (*Set, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, ErrClosed
	}
	return t.harvest()
}

// harvest is Harvest with t.mu held (or during New).
func (t *Tracker) harvest() (*Set, error) {
	s := NewSet(t.mem)
	if t.logging.Ring {
		if err := t.reapRings(s); err != nil {
			return nil, err
		}
	}
	for i, r := range t.mem.Regions() {
		sr := &s.regions[i]
		if !t.logging.Ring {
			if err := t.slots.DirtyLog(r.Slot, sr.bits); err != nil {
				return nil, fmt.Errorf("memory slot %d: get dirty log: %w", r.Slot, err)
			}
		}
		if t.logging.ManualProtect {
			if err := t.clear(r, sr.bits); err != nil {
				return nil, err
			}
		}
		r.HarvestVMMDirty(sr.bits)
		sr.maskTail()
	}
	return s, nil
}

// reapRings adds the pages of the vCPUs' dirty rings to s. KVM collects
// them and re-arms them in that order, and the caller reads pages only
// after Harvest returns, so a write that races with the reap is read by
// the caller or pushed to a ring again, as with the bitmap.
func (t *Tracker) reapRings(s *Set) error {
	var stray error
	err := t.slots.ReapRings(func(slot uint32, page uint64) {
		i := -1
		if slot < uint32(len(t.slotIdx)) {
			i = t.slotIdx[slot]
		}
		if i < 0 || page >= s.regions[i].pages {
			stray = fmt.Errorf("dirty ring entry for page %d of slot %d, outside guest memory", page, slot)
			return
		}
		s.regions[i].bits[page/64] |= 1 << (page % 64)
	})
	if err != nil {
		return fmt.Errorf("reap dirty rings: %w", err)
	}
	return stray
}

// clear re-protects the pages set in bitmap (KVM_CLEAR_DIRTY_LOG), in
// chunks that skip the all-clean stretches.
func (t *Tracker) clear(r *guestmem.Region, bitmap []uint64) error {
	pages := r.Pages()
	for first := uint64(0); first < pages; first += clearChunk {
		n := min(pages-first, clearChunk)
		words := bitmap[first/64 : (first+n+63)/64]
		if allZero(words) {
			continue
		}
		if err := t.slots.ClearDirtyLog(r.Slot, first, uint32(n), words); err != nil {
			return fmt.Errorf("memory slot %d: clear dirty log of pages %d+%d: %w", r.Slot, first, n, err)
		}
	}
	return nil
}

func allZero(words []uint64) bool {
	for _, w := range words {
		if w != 0 {
			return false
		}
	}
	return true
}

// Close turns dirty logging off on every slot and, if New enabled it,
// manual protection. Harvest afterwards returns ErrClosed. Close is
// idempotent; it reports a failure, but marks the Tracker closed whatever
// happens.
func (t *Tracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	return t.slots.StopLogging()
}
