package guestmem

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Copy-on-write snapshots of guest pages (userfaultfd write-protect, as
// QEMU's background snapshot).
//
// A Protector registers all of guest memory with one userfaultfd in
// write-protect mode and serves its faults on a thread of its own. Begin,
// called with the guest stopped, write-protects a set of pages and returns
// a Snapshot; the caller resumes the guest and the Snapshot's copier
// copies each page into the caller's buffer, then un-protects it. A write
// to a page not yet copied is held by the kernel (a vCPU's, taken through
// KVM's fault path; any thread's) until the fault handler has copied the
// page and un-protected it; a write through this package's accessors
// (WriteAt, Fill) copies the page itself first and never faults. Either
// way the buffer holds every page as it was at Begin.
//
// Arming: write-protection costs about 0.1 µs a page, too much to spend
// on every page in the pause. Arm, called with the guest running just
// before the pause, protects the pages the last snapshot held (a guest
// dirties much the same pages from one epoch to the next). A write to an
// armed page before Begin is let through at once (it is before the cut:
// no copy), and the page noted as touched. Begin then protects only the
// pages of its set that are not armed or were touched, under the same lock
// as the fault path's noting, so every page of the set is protected when
// the guest resumes; the armed pages outside the set are let go after the
// copy. Arm may be called again before Begin to add pages (the
// replicator's pre-harvested ones).
//
// Why the VMM's own writes must not fault: a goroutine stopped on a fault
// in user mode inside an assembly copy cannot be preempted and keeps its
// P, so a garbage collection's stop-the-world would wait for it while the
// handler, back from its poll, waits for the world to start again; and
// two such goroutines hold both Ps of a two-core host, leaving none for
// the handler (TestArmRacesWithWriters hung so). Faults taken in the
// kernel (KVM_RUN, read(2) into guest memory) leave their goroutine in a
// system call, which the runtime does not wait for. So a VMM write holds
// Memory.writing (read) from its look at the Protector to its last byte,
// and Arm and Begin hold it (write) while they protect: no page is
// protected between a write's making it writable and the write.
//
// And a fault never leaves its page protected: the handler un-protects
// (after copying, for a page the snapshot still needs) every page it is
// told of, armed, touched already or neither. Waking the writer of a page
// still protected only has it fault again, for good: a vCPU so held keeps
// KVM_RUN from returning (the wait is killable only: kicks do not end it)
// and the next pause waits for it forever, holding the guest's output.

// page states in Protector.state, per Snapshot generation g: 2g claimed
// (being copied), 2g+1 copied and un-protected; anything else pending.
func claimed(gen uint64) uint64 { return 2 * gen }
func copied(gen uint64) uint64  { return 2*gen + 1 }

// PageBitmap is a set of guest pages as bitmaps: Words(i) is region i's
// (in Memory.Regions order), one bit per page, 64 pages per word
// (dirtylog.Set).
type PageBitmap interface {
	Words(region int) []uint64
}

// Protector write-protects pages of one Memory for snapshots. Arm, Begin
// and Close are called by one goroutine (the replicator's epoch loop);
// faults are served concurrently.
type Protector struct {
	mem   *Memory
	u     *uffd
	bases []uintptr // host address of each region
	stop  int       // eventfd: ends the fault handler
	done  chan struct{}

	// armMu orders the noting of touched armed pages (faults, VMM writes)
	// with Begin's reading of them.
	armMu   sync.Mutex
	armed   bool       // between Arm and Begin (or Disarm)
	armBits [][]uint64 // per region: the pages Arm protected
	touched [][]uint64 // per region: armed pages written since, let through
	scratch [][]uint64 // per region: the pages an Arm call protects (its goroutine's)

	// Owned by Begin's caller; the slices are read by the handler through
	// the current Snapshot only.
	gen   uint64
	state []atomic.Uint64
	last  *Snapshot // the latest, finished or not: what Arm predicts from
	// forgot: Forget was called since the last Begin; Arm then predicts
	// nothing from last (under armMu).
	forgot bool

	// inUse is held (read) by whoever works on the current Snapshot (the
	// handler, a VMM write); uninstall takes it to wait for them, so the
	// caller may reuse the Snapshot's buffer once Wait returns.
	inUse sync.RWMutex

	// pendMu orders ResolvePending's use of the userfaultfd with Close
	// (closed: no more reads of a descriptor whose number may be reused);
	// pendMsgs is ResolvePending's buffer (its one caller's at a time).
	pendMu   sync.RWMutex
	closed   bool
	pendMsgs []uffdMsg

	faults     atomic.Uint64 // pages copied by a write fault (handler)
	vmmWrites  atomic.Uint64 // pages copied by a VMM write (accessor)
	armFaults  atomic.Uint64 // armed pages written before the cut
	reported   atomic.Uint64 // write faults read from the userfaultfd
	handlerErr atomic.Pointer[error]
}

// NewProtector checks on a scratch page that a protected page's write is
// reported and let through once un-protected, opens a userfaultfd,
// registers mem with it in write-protect mode, and starts the fault
// handler. An error wraps ErrNoWriteProtect when the host lacks the
// feature.
func NewProtector(mem *Memory) (*Protector, error) {
	return newProtector(mem, true)
}

// newProtector is NewProtector; without handler no thread serves the
// faults (a test's: only ResolvePending resolves them).
func newProtector(mem *Memory, handler bool) (*Protector, error) {
	if err := probeWriteProtect(); err != nil {
		return nil, err
	}
	u, err := openUffd()
	if err != nil {
		return nil, err
	}
	p := &Protector{mem: mem, u: u, done: make(chan struct{})}
	for i, r := range mem.regions {
		base := hostAddr(r.Host)
		if err := u.register(base, uintptr(r.Size)); err != nil {
			p.unregister()
			u.close()
			return nil, fmt.Errorf("guest memory region %d: %w", i, err)
		}
		p.bases = append(p.bases, base)
		p.armBits = append(p.armBits, make([]uint64, r.BitmapWords()))
		p.touched = append(p.touched, make([]uint64, r.BitmapWords()))
		p.scratch = append(p.scratch, make([]uint64, r.BitmapWords()))
	}
	p.stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		p.unregister()
		u.close()
		return nil, fmt.Errorf("fault handler eventfd: %w", err)
	}
	if !handler {
		close(p.done)
		return p, nil
	}
	go p.serve()
	return p, nil
}

// ProtectorStats are a Protector's counters since it was created.
type ProtectorStats struct {
	// Faults counts pages copied because a write faulted on them (a vCPU
	// through KVM, or any thread) before the copier reached them;
	// VMMWrites those copied first by the VMM's own writes (WriteAt,
	// Fill); ArmedWrites the armed pages written before the cut (let
	// through, then protected in the pause).
	Faults, VMMWrites, ArmedWrites uint64
}

// Stats returns the counters.
func (p *Protector) Stats() ProtectorStats {
	return ProtectorStats{Faults: p.faults.Load(), VMMWrites: p.vmmWrites.Load(), ArmedWrites: p.armFaults.Load()}
}

// Close stops the fault handler, un-protects all of guest memory (waking
// any writer still waiting), unregisters it and closes the userfaultfd.
// A Snapshot in progress must have finished (Wait). Idempotent.
func (p *Protector) Close() error {
	if p.u.fd < 0 {
		return nil
	}
	p.pendMu.Lock()
	p.closed = true
	p.pendMu.Unlock()
	var one [8]byte
	one[0] = 1
	_, _ = unix.Write(p.stop, one[:])
	<-p.done
	p.armMu.Lock()
	p.armed = false
	p.armMu.Unlock()
	var first error
	for i, r := range p.mem.regions {
		if err := p.u.protect(p.bases[i], uintptr(r.Size), false, false); err != nil && first == nil {
			first = fmt.Errorf("un-protect guest memory region %d: %w", i, err)
		}
	}
	p.mem.wp.Store(nil)
	p.inUse.Lock()
	p.inUse.Unlock() //nolint:staticcheck // empty: waits for the VMM writes in progress
	p.unregister()
	_ = unix.Close(p.stop)
	p.u.close()
	if e := p.handlerErr.Load(); e != nil && first == nil {
		first = *e
	}
	return first
}

func (p *Protector) unregister() {
	for i, b := range p.bases {
		_ = p.u.unregister(b, uintptr(p.mem.regions[i].Size))
	}
}

// serve reads the userfaultfd and resolves each write fault, on a thread
// of its own for its whole life: the threads it wakes wait on it.
func (p *Protector) serve() {
	runtime.LockOSThread()
	defer close(p.done)
	msgs := make([]uffdMsg, 64)
	fds := []unix.PollFd{{Fd: int32(p.u.fd), Events: unix.POLLIN}, {Fd: int32(p.stop), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			p.fail(fmt.Errorf("poll userfaultfd: %w", err))
			return
		}
		if fds[1].Revents != 0 {
			return
		}
		if err := p.drain(msgs); err != nil {
			p.fail(err)
			return
		}
	}
}

// drain resolves the faults pending on the userfaultfd, if any. The
// handler calls it when poll says there are; the copier too, between
// batches: a goroutine waits for a P like any other, and the copier has
// one when the handler may not.
func (p *Protector) drain(msgs []uffdMsg) error {
	n, err := p.u.read(msgs)
	if err != nil {
		return fmt.Errorf("read userfaultfd: %w", err)
	}
	for _, m := range msgs[:n] {
		if m.Event != uffdEventPagefault {
			continue
		}
		p.reported.Add(1)
		if err := p.fault(uintptr(m.Address)); err != nil {
			return err
		}
	}
	return nil
}

// ResolvePending resolves the write faults already reported, as the
// handler would, without waiting for any: a pause that polls for its
// vCPUs calls it between looks (vmm.Machine.SetPauseHelper). A vCPU that
// wrote an armed page after the pause's kick waits in the kernel for the
// fault's resolution, which the kick does not end; the handler resolves
// it only once woken (on this project's host, resolving from the poll
// took 11-46 µs off the stop step's median: bench/results/20261206T205500Z).
// It reads nothing while nothing is armed or snapshotted, and nothing
// after Close. Calls
// must not overlap (one pausing goroutine at a time); the handler and
// the copier drain concurrently, each reading different faults.
func (p *Protector) ResolvePending() {
	p.pendMu.RLock()
	defer p.pendMu.RUnlock()
	if p.closed {
		return
	}
	p.armMu.Lock()
	armed := p.armed
	p.armMu.Unlock()
	if !armed && p.mem.snap.Load() == nil {
		return // nothing protected for a snapshot: no fault to wait on us
	}
	if p.pendMsgs == nil {
		p.pendMsgs = make([]uffdMsg, 8)
	}
	if err := p.drain(p.pendMsgs); err != nil {
		p.fail(err)
	}
}

func (p *Protector) fail(err error) {
	p.handlerErr.CompareAndSwap(nil, &err)
	// Nothing will resolve faults any more: let every writer through. The
	// snapshot in progress is then not to be trusted: Wait reports it.
	for i, r := range p.mem.regions {
		_ = p.u.protect(p.bases[i], uintptr(r.Size), false, false)
	}
}

// fault resolves a write fault at host address addr.
func (p *Protector) fault(addr uintptr) error {
	for i, r := range p.mem.regions {
		base := p.bases[i]
		if addr < base || addr >= base+uintptr(r.Size) {
			continue
		}
		p.inUse.RLock()
		if p.resolve(r, uint64(addr-base)>>PageShift, true) {
			p.faults.Add(1)
		}
		p.inUse.RUnlock()
		return nil
	}
	return fmt.Errorf("write fault at %#x outside guest memory", addr)
}

// resolve makes page pg of region r writable as far as snapshots go, and
// wakes whoever waits on a fault there: an armed page is noted as touched
// and un-protected (every time), a page the current snapshot still
// needs is copied first (and un-protected), an armed page the snapshot
// does not need is un-protected. For a fault (rather than a VMM write
// about to happen) any other page is un-protected too: the fault may be
// stale, or the page protected by an earlier failure; un-protecting a
// writable page is harmless, and a fault never leaves its page
// protected (waking the writer of a page still protected would have it
// fault again, for good: a VMM write that noted an armed page touched
// just before Arm protected it left it so). It reports whether it copied
// the page. The caller holds inUse (read): the snapshot it finds stays
// current meanwhile.
func (p *Protector) resolve(r *Region, pg uint64, fault bool) bool {
	w, bit := pg/64, uint64(1)<<(pg%64)
	addr := p.bases[r.Slot] + uintptr(pg*PageSize)
	p.armMu.Lock()
	defer p.armMu.Unlock()
	if p.armed {
		// Un-protected under armMu, so that Begin, which protects the
		// touched pages again, comes either before (the page is still
		// armed, and this write precedes the cut) or after (it sees it
		// touched).
		// Un-protected even when touched already: a VMM write that noted
		// it touched before Arm got to protect it left it protected.
		inArm := p.armBits[r.Slot][w]&bit != 0
		if inArm && p.touched[r.Slot][w]&bit == 0 {
			p.touched[r.Slot][w] |= bit
			p.armFaults.Add(1)
		}
		if inArm || fault {
			_ = p.u.protect(addr, PageSize, false, false)
		}
		return false
	}
	if s := p.mem.snap.Load(); s != nil {
		if i, ok := s.index(r, pg); ok {
			p.armMu.Unlock()
			copied := s.take(r, pg, i)
			p.armMu.Lock()
			return copied
		}
		if s.free[r.Slot][w]&bit != 0 {
			fault = true // armed, protected, and not needed: let it go now
		}
	}
	if fault {
		_ = p.u.protect(addr, PageSize, false, false)
	}
	return false
}

// beforeWrite is called by WriteAt and Fill, which found the Protector
// armed or a snapshot in progress, before they write [off, off+n) of r:
// each page of it is made writable first (resolve), so the VMM's write
// never faults.
func (p *Protector) beforeWrite(r *Region, off, n uint64) {
	if n == 0 {
		return
	}
	p.inUse.RLock()
	defer p.inUse.RUnlock()
	for pg := off >> PageShift; pg <= (off+n-1)>>PageShift; pg++ {
		if p.resolve(r, pg, false) {
			p.vmmWrites.Add(1)
		}
	}
}

// Arm write-protects the pages the last snapshot held (none after
// Forget), with the guest running, ahead of the Begin that follows (see
// "Arming" above); with extra (nil: none), those pages too. Called again before Begin, it
// protects only the pages of extra not armed yet (the replicator arms
// last epoch's pages, pre-harvests the dirty log, then arms what the
// pre-harvest found). Without a last snapshot or extra it does nothing.
// Pages are marked armed before they are protected: a write that faults
// on one finds it armed and is let through.
func (p *Protector) Arm(extra PageBitmap) error {
	p.armMu.Lock()
	again := p.armed
	last := p.last
	if p.forgot {
		last = nil
	}
	if !again && last == nil && extra == nil {
		p.armMu.Unlock()
		return nil
	}
	for k := range p.armBits {
		add := p.scratch[k]
		clear(add)
		if !again {
			if last != nil && k < len(last.want) {
				copy(add, last.want[k])
			}
			clear(p.armBits[k])
			clear(p.touched[k])
		}
		if extra != nil {
			for w, v := range extra.Words(k) {
				if w < len(add) {
					add[w] |= v
				}
			}
		}
		for w := range add {
			add[w] &^= p.armBits[k][w]
			p.armBits[k][w] |= add[w]
		}
	}
	p.armed = true
	p.armMu.Unlock()
	p.mem.wp.Store(p)
	for k, r := range p.mem.regions {
		// The VMM's writes wait while a run is protected (Memory.writing),
		// at most armChunk pages: none is then caught half-way.
		err := bitRuns(p.scratch[k], armChunk, func(pg, n uint64) error {
			p.mem.writing.Lock()
			defer p.mem.writing.Unlock()
			return p.u.protect(p.bases[k]+uintptr(pg*PageSize), uintptr(n*PageSize), true, false)
		})
		if err != nil {
			p.Disarm()
			return fmt.Errorf("arm write-protection of region %#x: %w", uint64(r.GPA), err)
		}
	}
	return nil
}

// armChunk bounds the pages Arm protects in one call, holding the VMM's
// writes meanwhile (about 0.1 µs a page).
const armChunk = 1024

// Disarm lets go of the armed pages when no Begin follows Arm.
func (p *Protector) Disarm() {
	p.armMu.Lock()
	defer p.armMu.Unlock()
	if !p.armed {
		return
	}
	p.armed = false
	for k := range p.armBits {
		_ = bitRuns(p.armBits[k], 1<<30, func(pg, n uint64) error {
			return p.u.protect(p.bases[k]+uintptr(pg*PageSize), uintptr(n*PageSize), false, false)
		})
	}
	p.mem.wp.CompareAndSwap(p, nil)
}

// Forget drops the prediction: until the next Begin, Arm protects only
// the pages it is given, not the last snapshot's. For a caller that took
// a checkpoint without a snapshot (copied with the guest stopped): the
// last snapshot's pages are then older than the guest's latest dirty
// set, and arming them would only make the guest fault on pages no
// snapshot needs.
func (p *Protector) Forget() {
	p.armMu.Lock()
	p.forgot = true
	p.armMu.Unlock()
}
