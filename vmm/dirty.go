package vmm

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"govmm/dirtylog"
	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// ErrDirtyTrackingBusy is returned by TrackDirty while another tracker is
// open: two trackers would each take bits the other needs (every harvest
// clears what it reports), so both copies of memory would diverge.
var ErrDirtyTrackingBusy = errors.New("dirty tracking already in use (a migration or replication is running)")

// ErrNoDirtyRing is returned by New when Config.DirtyTracking asks for the
// dirty ring and KVM does not offer it.
var ErrNoDirtyRing = errors.New("kvm lacks the dirty ring (KVM_CAP_DIRTY_LOG_RING)")

// Dirty tracking modes (Config.DirtyTracking).
const (
	DirtyAuto   = "auto"
	DirtyBitmap = "bitmap"
	DirtyRing   = "ring"
)

// ErrDirtyRingOverflow means KVM pushed more dirty pages into a vCPU's
// ring than it holds instead of stopping the vCPU first (KVM_EXIT_DIRTY_RING_FULL),
// so pages were lost. kvm_pvm does so (KVM on hardware does not): use the
// bitmap there, or a ring with an entry for every page of guest memory.
var ErrDirtyRingOverflow = errors.New("dirty ring overflowed: kvm wrote past entries not yet collected")

// DefaultDirtyRingEntries is each vCPU's dirty ring when
// Config.DirtyRingEntries is 0 (or KVM's limit, if smaller): 1 MiB of
// entries, so that an epoch of up to ~64k dirty pages per vCPU ends
// without a ring-full exit.
const DefaultDirtyRingEntries = 1 << 16

// minDirtyRingEntries is KVM's floor: one page of entries.
const minDirtyRingEntries = 256

// dirtyGFNSize is the size of struct kvm_dirty_gfn.
const dirtyGFNSize = 16

// manualProtectEnable is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, the one flag
// of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 used (KVM API document, section
// 7.18). With KVM_DIRTY_LOG_INITIALLY_SET the first bitmap would be all
// ones, which dirtylog.New throws away anyway.
const manualProtectEnable = 1 << 0

// dirtyRings is the machine's set of per-vCPU dirty rings, when it uses
// them (entries > 0). The vCPUs add their ring as they are created; the
// open tracker's harvests and the vCPUs' ring-full exits reap them, one at
// a time under mu.
type dirtyRings struct {
	entries int // per vCPU; 0: the machine uses KVM's bitmaps

	mu     sync.Mutex          // one reaper at a time; guards the fields below
	rings  []*kvmapi.DirtyRing // one per vCPU created
	active *dirtySlots         // the open tracker's side, or nil
	closed bool                // the vCPU fds (and their rings) are gone

	// resets counts KVM_RESET_DIRTY_RINGS (written under mu, read by the
	// vCPUs without it): a vCPU notes it before each KVM_RUN, so that at
	// a ring-full exit it can tell a ring a harvest emptied meanwhile
	// from KVM out of step with us.
	resets atomic.Uint64

	// beforeFull, when set (by tests, before the machine starts), runs on
	// the vCPU's thread at a ring-full exit before the rings are reaped:
	// it puts a harvest into the window the resets count is for.
	beforeFull func()
	// noWatcher and noTicks, when set (by tests, before the machine
	// starts), leave out the watcher's goroutine and the vCPUs' ticks
	// (ringwatch.go, cputimer.go), to show what each does alone.
	noWatcher, noTicks bool
}

// setupDirtyTracking picks the machine's dirty tracking (Config.DirtyTracking)
// and, for the ring, enables it on the VM: KVM wants that before the first
// vCPU exists, so the choice holds for the machine's life.
//
// "auto" takes the bitmap (with manual protection), which wins where it
// matters on the hosts measured (bench checkpoint, harvest rows): a
// checkpoint harvest of 1k to 64k dirty pages costs about a third of the
// ring's (100 pages: a tie), because the ring's entries are collected and
// then re-armed by KVM_RESET_DIRTY_RINGS one by one, where
// KVM_CLEAR_DIRTY_LOG takes 64 pages per bitmap word; the bitmap scan the
// ring saves is only ~30 µs per GiB. The ring wins only for a guest of
// many GiB with a small dirty set; ask for it there with "ring".
func (m *Machine) setupDirtyTracking() error {
	maxBytes := m.vm.CheckExtension(kvmapi.CapDirtyLogRing)
	offered := maxBytes >= minDirtyRingEntries*dirtyGFNSize
	switch m.cfg.DirtyTracking {
	case DirtyBitmap, DirtyAuto:
		return nil
	case DirtyRing:
		if !offered {
			return fmt.Errorf("%s: %w", kvmDevice, ErrNoDirtyRing)
		}
	}
	entries := m.cfg.DirtyRingEntries
	if entries == 0 {
		entries = min(DefaultDirtyRingEntries, maxBytes/dirtyGFNSize)
	}
	if entries*dirtyGFNSize > maxBytes {
		return fmt.Errorf("dirty ring of %d entries exceeds kvm's limit of %d", entries, maxBytes/dirtyGFNSize)
	}
	if err := m.vm.EnableDirtyRing(uint32(entries * dirtyGFNSize)); err != nil {
		return fmt.Errorf("enable a dirty ring of %d entries: %w", entries, err)
	}
	m.ring.entries = entries
	return nil
}

// checkDirtyConfig checks Config.DirtyTracking and DirtyRingEntries, and
// spells out the default.
func checkDirtyConfig(cfg *Config) error {
	switch cfg.DirtyTracking {
	case "":
		cfg.DirtyTracking = DirtyAuto
	case DirtyAuto, DirtyBitmap, DirtyRing:
	default:
		return fmt.Errorf("dirty tracking %q: want auto, bitmap or ring", cfg.DirtyTracking)
	}
	n := cfg.DirtyRingEntries
	if n != 0 && (n < minDirtyRingEntries || n&(n-1) != 0) {
		return fmt.Errorf("dirty ring of %d entries: want a power of two of at least %d", n, minDirtyRingEntries)
	}
	return nil
}

// DirtyTracking reports what the machine uses to learn the pages vCPUs
// write: DirtyRing or DirtyBitmap.
func (m *Machine) DirtyTracking() string {
	if m.ring.entries > 0 {
		return DirtyRing
	}
	return DirtyBitmap
}

// addDirtyRing maps a new vCPU's ring, when the machine uses rings. The
// vCPU calls it right after creating its fd.
func (m *Machine) addDirtyRing(fd *kvmapi.VCPU) error {
	if m.ring.entries == 0 {
		return nil
	}
	r, err := fd.MapDirtyRing(m.ring.entries)
	if err != nil {
		return err
	}
	m.ring.mu.Lock()
	m.ring.rings = append(m.ring.rings, r)
	m.ring.mu.Unlock()
	return nil
}

// dirtyRingFull serves a vCPU's ExitDirtyRingFull: it reaps every ring
// into the open tracker's pending pages (the next harvest reports them),
// or drops the entries when no tracker is open (then nothing logs, and
// the next tracker starts from "everything clean"), and re-arms them, so
// that the vCPU can run again. resetsAtRun is m.ring.resets as the vCPU
// entered KVM_RUN: a harvest that reaped and reset the rings between the
// exit and this call leaves nothing to collect, and the vCPU just runs
// again.
func (m *Machine) dirtyRingFull(resetsAtRun uint64) error {
	if m.ring.beforeFull != nil {
		m.ring.beforeFull()
	}
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	add := func(uint32, uint64) {}
	if d := m.ring.active; d != nil {
		add = d.addPending
	}
	n, err := m.reapLocked(add)
	if err == nil && n == 0 && m.ring.resets.Load() == resetsAtRun {
		// KVM counts the ring full, yet no entry is there to collect
		// and nobody reset the rings since the vCPU entered KVM_RUN:
		// KVM is out of step with us, and the vCPU would spin on this
		// exit for ever.
		err = ErrDirtyRingOverflow
	}
	return err
}

// reapLocked collects every ring's published entries into add and resets
// them (KVM_RESET_DIRTY_RINGS), with m.ring.mu held. Reset comes after
// the collection, and the caller reads the pages only after reapLocked
// returns, so a write to a page either lands before the reset (and the
// caller reads it) or faults on the new protection and is pushed again.
func (m *Machine) reapLocked(add func(slot uint32, page uint64)) (int, error) {
	if m.ring.closed {
		return 0, errors.New("dirty rings: machine closed")
	}
	n := 0
	for i, r := range m.ring.rings {
		k := r.Collect(add)
		if k >= r.Entries() {
			// KVM stops a vCPU when its ring is nearly full, and keeps
			// entries in reserve for what it logs meanwhile: a full lap
			// means it went on and wrote over entries never collected.
			return 0, fmt.Errorf("%w (the ring of vcpu %d)", ErrDirtyRingOverflow, i)
		}
		n += k
	}
	if n == 0 {
		return 0, nil
	}
	if _, err := m.vm.ResetDirtyRings(); err != nil {
		return 0, fmt.Errorf("reset dirty rings: %w", err)
	}
	m.ring.resets.Add(1)
	return n, nil
}

// closeDirtyRings stops all reaping: the vCPU fds, which map the rings,
// are about to close.
func (m *Machine) closeDirtyRings() {
	m.ring.mu.Lock()
	m.ring.closed = true
	m.ring.mu.Unlock()
}

// TrackDirty starts tracking the pages of guest memory written from now
// on, by the vCPUs (KVM's dirty log: the bitmaps or the rings, as the
// machine was built) and by the VMM (guestmem): the tracker that
// migration and replication harvest at each round and cut. The machine
// owns its memory slots, so it alone turns their dirty logging on and off.
// One tracker at a time: a second one gets ErrDirtyTrackingBusy until the
// first is closed.
func (m *Machine) TrackDirty(opts dirtylog.Options) (*dirtylog.Tracker, error) {
	return dirtylog.New(&dirtySlots{m: m}, m.mem, opts)
}

// dirtySlots is the machine's side of a dirtylog.Tracker.
type dirtySlots struct {
	m      *Machine
	manual bool

	// pending holds the pages reaped at ring-full exits since the last
	// harvest, one bitmap per memory slot (guarded by m.ring.mu).
	pending map[uint32][]uint64
	any     bool        // pending has a bit set
	stray   [][2]uint64 // entries outside every slot: {slot, page}

	// The ring watcher (ringwatch.go), while a ring tracker is open:
	// started and stopped by StartLogging and StopLogging; watchErr and
	// watchReaps are guarded by m.ring.mu.
	watch      *ringWatch
	watchErr   error
	watchReaps int
}

var _ dirtylog.Slots = (*dirtySlots)(nil)

// StartLogging implements dirtylog.Slots.
func (d *dirtySlots) StartLogging(manualProtect bool) (dirtylog.Logging, error) {
	m := d.m
	if !m.tracking.CompareAndSwap(false, true) {
		return dirtylog.Logging{}, ErrDirtyTrackingBusy
	}
	ring := m.ring.entries > 0
	if ring {
		// Before logging starts, so that no ring-full exit drops an
		// entry this tracker needs.
		m.ring.mu.Lock()
		m.ring.active = d
		m.ring.mu.Unlock()
	} else if manualProtect && m.vm.CheckExtension(kvmapi.CapManualDirtyLogProtect2)&manualProtectEnable != 0 {
		// Before logging starts, so that no bitmap is ever read in the
		// other mode.
		if err := m.vm.EnableCap(kvmapi.CapManualDirtyLogProtect2, manualProtectEnable); err != nil {
			m.tracking.Store(false)
			return dirtylog.Logging{}, fmt.Errorf("enable manual dirty log protect: %w", err)
		}
		d.manual = true
	}
	for _, r := range m.mem.Regions() {
		if err := m.setSlot(r, kvmapi.MemLogDirtyPages); err != nil {
			_ = d.StopLogging()
			return dirtylog.Logging{}, fmt.Errorf("memory slot %d: enable dirty logging: %w", r.Slot, err)
		}
	}
	if ring {
		d.watchRings()
	}
	return dirtylog.Logging{Ring: ring, ManualProtect: d.manual}, nil
}

// StopLogging implements dirtylog.Slots. It reports every failure and
// frees the machine for the next tracker whatever happens.
func (d *dirtySlots) StopLogging() error {
	m := d.m
	defer m.tracking.Store(false)
	d.stopWatching()
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
	if m.ring.entries > 0 {
		// Nothing logs any more: empty the rings, so that the next
		// tracker starts with all of each ring free.
		m.ring.mu.Lock()
		m.ring.active = nil
		if !m.ring.closed {
			if _, err := m.reapLocked(func(uint32, uint64) {}); err != nil {
				errs = append(errs, err)
			}
		}
		m.ring.mu.Unlock()
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

// ReapRings implements dirtylog.Slots: the pages reaped at ring-full exits
// since the last call, then every ring's published entries.
func (d *dirtySlots) ReapRings(add func(slot uint32, page uint64)) error {
	m := d.m
	m.ring.mu.Lock()
	defer m.ring.mu.Unlock()
	if err := d.watchErr; err != nil {
		return err
	}
	if d.any {
		for slot, words := range d.pending {
			for i, w := range words {
				for ; w != 0; w &= w - 1 {
					add(slot, uint64(i)*64+uint64(bits.TrailingZeros64(w)))
				}
				words[i] = 0
			}
		}
		for _, e := range d.stray {
			add(uint32(e[0]), e[1])
		}
		d.any, d.stray = false, d.stray[:0]
	}
	_, err := m.reapLocked(add)
	return err
}

// addPending records a page reaped at a ring-full exit or by the ring
// watcher (m.ring.mu held).
// An entry outside every slot would be KVM's bug; it is kept for the
// harvest to report rather than dropped here.
func (d *dirtySlots) addPending(slot uint32, page uint64) {
	if d.pending == nil {
		d.pending = make(map[uint32][]uint64)
		for _, r := range d.m.mem.Regions() {
			d.pending[r.Slot] = make([]uint64, r.BitmapWords())
		}
	}
	words := d.pending[slot]
	if page/64 >= uint64(len(words)) {
		if len(d.stray) < 16 {
			d.stray = append(d.stray, [2]uint64{uint64(slot), page})
		}
		d.any = true
		return
	}
	words[page/64] |= 1 << (page % 64)
	d.any = true
}

// setSlot (re-)registers r's memory slot with flags. Only the flags change
// when the slot exists: KVM keeps its mappings (KVM API document, section
// 4.35 KVM_SET_USER_MEMORY_REGION).
func (m *Machine) setSlot(r *guestmem.Region, flags uint32) error {
	return m.vm.SetUserMemoryRegion(kvmapi.UserMemoryRegion{Slot: r.Slot, Flags: flags,
		GuestPhysAddr: uint64(r.GPA), MemorySize: r.Size, UserspaceAddr: hostAddr(r.Host)})
}
