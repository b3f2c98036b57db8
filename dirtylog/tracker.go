package dirtylog

import (
	"errors"
	"fmt"
	"sync"

	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// ErrClosed is returned by Harvest on a closed Tracker.
var ErrClosed = errors.New("dirty tracker closed")

// Flags of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (KVM API document, section
// 7.18). Only manualProtectEnable is used: with initiallySet the first
// bitmap would be all ones, which New throws away anyway.
const (
	manualProtectEnable = 1 << 0 // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
)

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

// Tracker collects the pages of one VM's memory written since the last
// Harvest, by vCPUs (KVM's dirty log) and by the VMM (guestmem's bitmap).
// While it is open it owns the KVM_MEM_LOG_DIRTY_PAGES flag of every slot.
type Tracker struct {
	vm     *kvmapi.VM
	mem    *guestmem.Memory
	manual bool // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled

	mu     sync.Mutex // mu serialises Harvest and Close; it guards closed
	closed bool
}

// New turns on KVM dirty logging for every memory slot of mem (which must
// be the memory registered in vm, slot for slot) and starts from
// "everything clean": the first KVM bitmaps and the VMM's bitmap are
// harvested and discarded. Pages written before New returns may therefore
// be missing from every Harvest; send all of memory once (NewFullSet),
// reading it after New returns.
//
// New may be called while vCPUs run. On failure it leaves logging off.
func New(vm *kvmapi.VM, mem *guestmem.Memory, opts Options) (*Tracker, error) {
	t := &Tracker{vm: vm, mem: mem}
	if opts.ManualProtect && vm.CheckExtension(kvmapi.CapManualDirtyLogProtect2)&manualProtectEnable != 0 {
		// Enable it before logging starts, so that no bitmap is ever
		// read in the other mode.
		if err := vm.EnableCap(kvmapi.CapManualDirtyLogProtect2, manualProtectEnable); err != nil {
			return nil, fmt.Errorf("enable manual dirty log protect: %w", err)
		}
		t.manual = true
	}
	ok := false
	defer func() {
		if !ok {
			_ = t.Close()
		}
	}()
	for _, r := range mem.Regions() {
		if err := t.setLogging(r, true); err != nil {
			return nil, err
		}
	}
	if _, err := t.harvest(); err != nil {
		return nil, fmt.Errorf("discard the first dirty log: %w", err)
	}
	ok = true
	return t, nil
}

// ManualProtect reports whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is in
// use (it was asked for and KVM has it).
func (t *Tracker) ManualProtect() bool { return t.manual }

// setLogging re-registers r's slot with dirty logging on or off. Only the
// flags change; KVM keeps the slot's mappings (KVM API document, section
// 4.35 KVM_SET_USER_MEMORY_REGION).
func (t *Tracker) setLogging(r *guestmem.Region, on bool) error {
	if len(r.Host) == 0 {
		return fmt.Errorf("memory slot %d: guest memory is unmapped", r.Slot)
	}
	u := kvmapi.UserMemoryRegion{Slot: r.Slot, GuestPhysAddr: uint64(r.GPA), MemorySize: r.Size,
		UserspaceAddr: hostAddr(r.Host)}
	what := "disable"
	if on {
		u.Flags = kvmapi.MemLogDirtyPages
		what = "enable"
	}
	if err := t.vm.SetUserMemoryRegion(u); err != nil {
		return fmt.Errorf("memory slot %d: %s dirty logging: %w", r.Slot, what, err)
	}
	return nil
}

// Harvest returns the pages written since the previous Harvest (or New):
// KVM's dirty bitmap of each slot ORed with the pages the VMM marked.
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
	for i, r := range t.mem.Regions() {
		sr := &s.regions[i]
		if err := t.vm.DirtyLog(r.Slot, sr.bits); err != nil {
			return nil, fmt.Errorf("memory slot %d: get dirty log: %w", r.Slot, err)
		}
		if t.manual {
			if err := t.clear(r, sr.bits); err != nil {
				return nil, err
			}
		}
		r.HarvestVMMDirty(sr.bits)
		sr.maskTail()
	}
	return s, nil
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
		if err := t.vm.ClearDirtyLog(r.Slot, first, uint32(n), words); err != nil {
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
// idempotent; it reports every failure, but marks the Tracker closed
// whatever happens.
func (t *Tracker) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil
	}
	t.closed = true
	var errs []error
	for _, r := range t.mem.Regions() {
		errs = append(errs, t.setLogging(r, false))
	}
	if t.manual {
		if err := t.vm.EnableCap(kvmapi.CapManualDirtyLogProtect2, 0); err != nil {
			errs = append(errs, fmt.Errorf("disable manual dirty log protect: %w", err))
		}
	}
	return errors.Join(errs...)
}
