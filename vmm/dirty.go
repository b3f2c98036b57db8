package vmm

import (
	"errors"
	"fmt"

	"govmm/dirtylog"
	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// ErrDirtyTrackingBusy is returned by TrackDirty while another tracker is
// open: two trackers would each take bits the other needs (every harvest
// clears what it reports), so both copies of memory would diverge.
var ErrDirtyTrackingBusy = errors.New("dirty tracking already in use (a migration or replication is running)")

// manualProtectEnable is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, the one flag
// of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 used (KVM API document, section
// 7.18). With KVM_DIRTY_LOG_INITIALLY_SET the first bitmap would be all
// ones, which dirtylog.New throws away anyway.
const manualProtectEnable = 1 << 0

// TrackDirty starts tracking the pages of guest memory written from now
// on, by the vCPUs (KVM's dirty log) and by the VMM (guestmem): the
// tracker that migration and replication harvest at each round and cut.
// The machine owns its memory slots, so it alone turns their dirty
// logging on and off. One tracker at a time: a second one gets
// ErrDirtyTrackingBusy until the first is closed.
func (m *Machine) TrackDirty(opts dirtylog.Options) (*dirtylog.Tracker, error) {
	return dirtylog.New(&dirtySlots{m: m}, m.mem, opts)
}

// dirtySlots is the machine's side of a dirtylog.Tracker.
type dirtySlots struct {
	m      *Machine
	manual bool
}

var _ dirtylog.Slots = (*dirtySlots)(nil)

// StartLogging implements dirtylog.Slots.
func (d *dirtySlots) StartLogging(manualProtect bool) (bool, error) {
	m := d.m
	if !m.tracking.CompareAndSwap(false, true) {
		return false, ErrDirtyTrackingBusy
	}
	if manualProtect && m.vm.CheckExtension(kvmapi.CapManualDirtyLogProtect2)&manualProtectEnable != 0 {
		// Before logging starts, so that no bitmap is ever read in the
		// other mode.
		if err := m.vm.EnableCap(kvmapi.CapManualDirtyLogProtect2, manualProtectEnable); err != nil {
			m.tracking.Store(false)
			return false, fmt.Errorf("enable manual dirty log protect: %w", err)
		}
		d.manual = true
	}
	for _, r := range m.mem.Regions() {
		if err := m.setSlot(r, kvmapi.MemLogDirtyPages); err != nil {
			_ = d.StopLogging()
			return false, fmt.Errorf("memory slot %d: enable dirty logging: %w", r.Slot, err)
		}
	}
	return d.manual, nil
}

// StopLogging implements dirtylog.Slots. It reports every failure and
// frees the machine for the next tracker whatever happens.
func (d *dirtySlots) StopLogging() error {
	m := d.m
	defer m.tracking.Store(false)
	var errs []error
	for _, r := range m.mem.Regions() {
		if err := m.setSlot(r, 0); err != nil {
			errs = append(errs, fmt.Errorf("memory slot %d: disable dirty logging: %w", r.Slot, err))
		}
	}
	if d.manual {
		d.manual = false
		if err := m.vm.EnableCap(kvmapi.CapManualDirtyLogProtect2, 0); err != nil {
			errs = append(errs, fmt.Errorf("disable manual dirty log protect: %w", err))
		}
	}
	return errors.Join(errs...)
}

// DirtyLog implements dirtylog.Slots.
func (d *dirtySlots) DirtyLog(slot uint32, bitmap []uint64) error {
	return d.m.vm.DirtyLog(slot, bitmap)
}

// ClearDirtyLog implements dirtylog.Slots.
func (d *dirtySlots) ClearDirtyLog(slot uint32, first uint64, n uint32, bitmap []uint64) error {
	return d.m.vm.ClearDirtyLog(slot, first, n, bitmap)
}

// setSlot (re-)registers r's memory slot with flags. Only the flags change
// when the slot exists: KVM keeps its mappings (KVM API document, section
// 4.35 KVM_SET_USER_MEMORY_REGION).
func (m *Machine) setSlot(r *guestmem.Region, flags uint32) error {
	return m.vm.SetUserMemoryRegion(kvmapi.UserMemoryRegion{Slot: r.Slot, Flags: flags,
		GuestPhysAddr: uint64(r.GPA), MemorySize: r.Size, UserspaceAddr: hostAddr(r.Host)})
}
