package guestmem

import (
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Copy-on-write snapshots of guest pages (userfaultfd write-protect, as
// QEMU's background snapshot).
//
// A Protector registers all of guest memory with one userfaultfd in
// write-protect mode and serves its faults on a goroutine of its own.
// Begin, called with the guest stopped, write-protects a set of pages and
// returns a Snapshot; the caller resumes the guest and the Snapshot's
// copier copies each page into the caller's buffer, then un-protects it.
// A write to a page not yet copied is held by the kernel (a vCPU's, taken
// through KVM's fault path; any thread's) until the fault handler has
// copied the page and un-protected it; a write through this package's
// accessors (WriteAt, Fill) copies the page itself first and never faults.
// Either way the buffer holds every page as it was at Begin.
//
// Why the VMM's own writes must not fault: a goroutine stopped on a fault
// in user mode inside an assembly copy cannot be preempted, so a garbage
// collection's stop-the-world would wait for it while the handler, back
// from its read, waits for the world to start again. Faults taken in the
// kernel (KVM_RUN, read(2) into guest memory) leave their goroutine in a
// system call, which the runtime does not wait for.

// page states in Protector.state, per Snapshot generation g: 2g claimed
// (being copied), 2g+1 copied and un-protected; anything else pending.
func claimed(gen uint64) uint64 { return 2 * gen }
func copied(gen uint64) uint64  { return 2*gen + 1 }

// Protector write-protects pages of one Memory for snapshots. Begin and
// Close are called by one goroutine (the replicator's epoch loop); faults
// are served concurrently.
type Protector struct {
	mem   *Memory
	u     *uffd
	bases []uintptr // host address of each region
	stop  int       // eventfd: ends the fault handler
	done  chan struct{}

	// Owned by Begin's caller; the slice is read by the handler through
	// the current Snapshot only.
	gen   uint64
	state []atomic.Uint64

	// inUse is held (read) by whoever works on the current Snapshot (the
	// handler, a VMM write); uninstall takes it to wait for them, so the
	// caller may reuse the Snapshot's buffers once Wait returns.
	inUse sync.RWMutex

	faults     atomic.Uint64 // pages copied by a write fault (handler)
	vmmWrites  atomic.Uint64 // pages copied by a VMM write (accessor)
	handlerErr atomic.Pointer[error]
}

// NewProtector opens a userfaultfd, registers mem with it in write-protect
// mode, checks on a scratch page that a protected page's write is reported
// and let through once un-protected, and starts the fault handler. An
// error wraps ErrNoWriteProtect when the host lacks the feature.
func NewProtector(mem *Memory) (*Protector, error) {
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
	}
	p.stop, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		p.unregister()
		u.close()
		return nil, fmt.Errorf("fault handler eventfd: %w", err)
	}
	go p.serve()
	return p, nil
}

// probeWriteProtect protects a page of a scratch mapping, writes it from
// another goroutine, and checks that the fault is reported and the write
// completes once the page is un-protected: some kernels accept the
// ioctls and still never report the fault.
func probeWriteProtect() error {
	u, err := openUffd()
	if err != nil {
		return err
	}
	defer u.close()
	b, err := unix.Mmap(-1, 0, PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("probe write-protect: map a page: %w", err)
	}
	defer unix.Munmap(b)
	b[0] = 1 // populated: write-protection applies to present pages
	addr := hostAddr(b)
	if err := u.register(addr, PageSize); err != nil {
		return err
	}
	defer u.unregister(addr, PageSize)
	if err := u.protect(addr, PageSize, true, false); err != nil {
		return fmt.Errorf("%w: UFFDIO_WRITEPROTECT: %v", ErrNoWriteProtect, err)
	}
	wrote := make(chan struct{})
	go func() {
		// A plain store (not an assembly copy): while it waits on the
		// fault, the goroutine stays preemptible.
		b[1] = 2
		close(wrote)
	}()
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
	reported := false
	for deadline := time.Now().Add(2 * time.Second); !reported && time.Now().Before(deadline); {
		if _, err := unix.Poll(fds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			break
		}
		msgs := make([]uffdMsg, 1)
		n, err := u.read(msgs)
		if err != nil {
			break
		}
		reported = n == 1 && msgs[0].Event == uffdEventPagefault && msgs[0].Flags&uffdPagefaultFlagWP != 0 &&
			uintptr(msgs[0].Address)&^(PageSize-1) == addr
	}
	// Whatever happened, let the writer through before unmapping.
	uerr := u.protect(addr, PageSize, false, false)
	select {
	case <-wrote:
	case <-time.After(2 * time.Second):
		return fmt.Errorf("%w: a write to an un-protected page stayed blocked", ErrNoWriteProtect)
	}
	if uerr != nil {
		return fmt.Errorf("%w: un-protect: %v", ErrNoWriteProtect, uerr)
	}
	if !reported {
		return fmt.Errorf("%w: a write to a protected page was not reported", ErrNoWriteProtect)
	}
	if b[1] != 2 {
		return fmt.Errorf("%w: a write held by a fault was lost", ErrNoWriteProtect)
	}
	return nil
}

// Stats are the Protector's counters since it was created.
type ProtectorStats struct {
	// Faults counts pages copied because a write faulted on them (a vCPU
	// through KVM, or any thread) before the copier reached them;
	// VMMWrites those copied by the VMM's own writes (WriteAt, Fill).
	Faults, VMMWrites uint64
}

// Stats returns the counters.
func (p *Protector) Stats() ProtectorStats {
	return ProtectorStats{Faults: p.faults.Load(), VMMWrites: p.vmmWrites.Load()}
}

// Close stops the fault handler, un-protects all of guest memory (waking
// any writer still waiting), unregisters it and closes the userfaultfd.
// A Snapshot in progress must have finished (Wait). Idempotent.
func (p *Protector) Close() error {
	if p.u.fd < 0 {
		return nil
	}
	var one [8]byte
	one[0] = 1
	_, _ = unix.Write(p.stop, one[:])
	<-p.done
	var first error
	for i, r := range p.mem.regions {
		if err := p.u.protect(p.bases[i], uintptr(r.Size), false, false); err != nil && first == nil {
			first = fmt.Errorf("un-protect guest memory region %d: %w", i, err)
		}
	}
	if s := p.mem.snap.Load(); s != nil {
		p.uninstall(s)
	}
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
		n, err := p.u.read(msgs)
		if err != nil {
			p.fail(fmt.Errorf("read userfaultfd: %w", err))
			return
		}
		for _, m := range msgs[:n] {
			if m.Event != uffdEventPagefault {
				continue
			}
			if err := p.fault(uintptr(m.Address)); err != nil {
				p.fail(err)
				return
			}
		}
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

// fault resolves a write fault at host address addr: the page is copied
// if the current snapshot still needs it, then un-protected (waking the
// writer).
func (p *Protector) fault(addr uintptr) error {
	for i, r := range p.mem.regions {
		base := p.bases[i]
		if addr < base || addr >= base+uintptr(r.Size) {
			continue
		}
		off := uint64(addr-base) &^ (PageSize - 1)
		p.inUse.RLock()
		if s := p.mem.snap.Load(); s != nil {
			if idx, ok := s.index(r.GPA + GPA(off)); ok {
				if s.take(idx) {
					p.faults.Add(1)
				}
			}
		}
		p.inUse.RUnlock()
		// Copied by whoever, or never part of the snapshot (a fault read
		// after its page was done): let the writer through.
		return p.u.protect(base+uintptr(off), PageSize, false, false)
	}
	return fmt.Errorf("write fault at %#x outside guest memory", addr)
}

// Snapshot is one set of pages being copied out of guest memory.
type Snapshot struct {
	p    *Protector
	gpas []GPA // sorted
	dst  []byte
	gen  uint64
	// progress: every page below copiedTo is in dst.
	copiedTo atomic.Int64
	mu       sync.Mutex
	cond     *sync.Cond
	finished chan struct{}
	err      error
	doneAt   time.Time
	ioctls   int
}

// Begin write-protects the pages at gpas (sorted, as dirtylog reports
// them), to be copied into dst (PageSize bytes per page, in the same
// order). Call it with the guest stopped: from then on a write to one of
// the pages waits until it is copied. Then resume the guest and call
// Snapshot.Copy. The previous Snapshot must have finished.
func (p *Protector) Begin(gpas []GPA, dst []byte) (*Snapshot, error) {
	if len(dst) < len(gpas)*PageSize {
		return nil, fmt.Errorf("snapshot of %d pages: buffer of %d bytes too small", len(gpas), len(dst))
	}
	if e := p.handlerErr.Load(); e != nil {
		return nil, fmt.Errorf("write-protect fault handler: %w", *e)
	}
	p.gen++
	if len(p.state) < len(gpas) {
		p.state = make([]atomic.Uint64, len(gpas)+len(gpas)/4)
	}
	s := &Snapshot{p: p, gpas: gpas, dst: dst, gen: p.gen, finished: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	p.mem.snap.Store(s)
	err := s.runs(0, len(gpas), len(gpas), func(r *Region, i, j int) error {
		s.ioctls++
		off := uint64(gpas[i] - r.GPA)
		return p.u.protect(p.bases[r.Slot]+uintptr(off), uintptr(j-i)*PageSize, true, false)
	})
	if err != nil {
		// Un-protect what was protected; nothing is copied.
		_ = s.runs(0, len(gpas), len(gpas), func(r *Region, i, j int) error {
			off := uint64(gpas[i] - r.GPA)
			return p.u.protect(p.bases[r.Slot]+uintptr(off), uintptr(j-i)*PageSize, false, false)
		})
		p.uninstall(s)
		return nil, fmt.Errorf("write-protect %d pages: %w", len(gpas), err)
	}
	return s, nil
}

// Protects is the number of UFFDIO_WRITEPROTECT calls Begin made (one per
// run of contiguous pages).
func (s *Snapshot) Protects() int { return s.ioctls }

// runs calls fn for each run [i, j) of pages within [from, to) contiguous
// in one region, at most max pages long.
func (s *Snapshot) runs(from, to, max int, fn func(r *Region, i, j int) error) error {
	var r *Region
	for i := from; i < to; {
		if r == nil || s.gpas[i] < r.GPA || s.gpas[i] >= r.End() {
			var err error
			if r, _, err = s.p.mem.find(s.gpas[i], PageSize); err != nil {
				return err
			}
		}
		j := i + 1
		for j < to && j-i < max && s.gpas[j] == s.gpas[j-1]+PageSize && s.gpas[j] < r.End() {
			j++
		}
		if err := fn(r, i, j); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// index finds gpa's page in the snapshot.
func (s *Snapshot) index(gpa GPA) (int, bool) {
	i := sort.Search(len(s.gpas), func(i int) bool { return s.gpas[i] >= gpa })
	return i, i < len(s.gpas) && s.gpas[i] == gpa
}

// take makes sure page i is in dst and un-protected: it claims and copies
// it, or waits for whoever claimed it. It reports whether it copied it.
func (s *Snapshot) take(i int) bool {
	st := &s.p.state[i]
	for {
		v := st.Load()
		switch v {
		case copied(s.gen):
			return false
		case claimed(s.gen):
			runtime.Gosched() // the copier un-protects its run, then marks it
			continue
		}
		if !st.CompareAndSwap(v, claimed(s.gen)) {
			continue
		}
		s.copyPage(i)
		r, off, _ := s.p.mem.find(s.gpas[i], PageSize)
		if err := s.p.u.protect(s.p.bases[r.Slot]+uintptr(off), PageSize, false, false); err != nil {
			s.p.fail(fmt.Errorf("un-protect page %#x: %w", uint64(s.gpas[i]), err))
		}
		st.Store(copied(s.gen))
		return true
	}
}

func (s *Snapshot) copyPage(i int) {
	page, _ := s.p.mem.Slice(s.gpas[i], PageSize)
	copy(s.dst[i*PageSize:(i+1)*PageSize], page)
}

// uninstall makes s no longer current and waits until nobody works on it.
func (p *Protector) uninstall(s *Snapshot) {
	p.mem.snap.CompareAndSwap(s, nil)
	p.inUse.Lock()
	p.inUse.Unlock() //nolint:staticcheck // an empty critical section: waits for the readers
}

// beforeWrite is called by WriteAt and Fill, which found a snapshot in
// progress, before they write [off, off+n) of r: each page of it the
// snapshot still needs is copied (and un-protected) first, so the VMM's
// write never faults.
func (p *Protector) beforeWrite(r *Region, off, n uint64) {
	p.inUse.RLock()
	defer p.inUse.RUnlock()
	s := p.mem.snap.Load()
	if s == nil || n == 0 {
		return
	}
	for p := off &^ (PageSize - 1); p < off+n; p += PageSize {
		if i, ok := s.index(r.GPA + GPA(p)); ok {
			if s.take(i) {
				s.p.vmmWrites.Add(1)
			}
		}
	}
}

// copyBatch bounds the pages the copier copies before un-protecting them
// and reporting progress: a writer that faults on a page the copier has
// claimed waits for at most this many page copies.
const copyBatch = 64

// Copy copies every page not yet copied into dst, in order, un-protecting
// each run of pages once copied; Page and Wait follow its progress. Run
// it once, after the guest has resumed (on a goroutine of its own to
// overlap with sending).
func (s *Snapshot) Copy() {
	err := s.runs(0, len(s.gpas), copyBatch, func(r *Region, i, j int) error {
		base := s.p.bases[r.Slot]
		// Claim and copy what no fault has claimed; un-protect the
		// sub-runs this copier copied.
		k := i
		for k < j {
			if !s.claim(k) {
				k++
				continue
			}
			e := k + 1
			for e < j && s.claim(e) {
				e++
			}
			for x := k; x < e; x++ {
				s.copyPage(x)
			}
			off := uint64(s.gpas[k] - r.GPA)
			if err := s.p.u.protect(base+uintptr(off), uintptr(e-k)*PageSize, false, false); err != nil {
				return fmt.Errorf("un-protect %d pages at %#x: %w", e-k, uint64(s.gpas[k]), err)
			}
			for x := k; x < e; x++ {
				s.p.state[x].Store(copied(s.gen))
			}
			k = e
		}
		// Pages a fault claimed are copied in a moment.
		for x := i; x < j; x++ {
			for s.p.state[x].Load() != copied(s.gen) {
				runtime.Gosched()
			}
		}
		s.advance(j)
		return nil
	})
	if err == nil {
		if e := s.p.handlerErr.Load(); e != nil {
			err = fmt.Errorf("write-protect fault handler: %w", *e)
		}
	}
	if err != nil {
		s.p.fail(err)
	}
	s.p.uninstall(s)
	s.mu.Lock()
	s.err = err
	s.doneAt = time.Now()
	s.cond.Broadcast()
	s.mu.Unlock()
	close(s.finished)
}

func (s *Snapshot) claim(i int) bool {
	st := &s.p.state[i]
	v := st.Load()
	return v != claimed(s.gen) && v != copied(s.gen) && st.CompareAndSwap(v, claimed(s.gen))
}

func (s *Snapshot) advance(j int) {
	s.mu.Lock()
	s.copiedTo.Store(int64(j))
	s.cond.Broadcast()
	s.mu.Unlock()
}

// Page waits until page i is copied and returns its bytes in dst (as of
// Begin).
func (s *Snapshot) Page(i int) ([]byte, error) {
	if s.copiedTo.Load() <= int64(i) {
		s.mu.Lock()
		for s.copiedTo.Load() <= int64(i) && s.err == nil {
			s.cond.Wait()
		}
		err := s.err
		s.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	return s.dst[i*PageSize : (i+1)*PageSize], nil
}

// Wait waits until Copy has finished: every page copied and un-protected.
// It returns when that was, and why the snapshot cannot be trusted, if it
// cannot.
func (s *Snapshot) Wait() (time.Time, error) {
	<-s.finished
	return s.doneAt, s.err
}
