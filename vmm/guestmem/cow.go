package guestmem

import (
	"errors"
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

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
// copy.
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

	// Owned by Begin's caller; the slices are read by the handler through
	// the current Snapshot only.
	gen   uint64
	state []atomic.Uint64
	last  *Snapshot // the latest, finished or not: what Arm predicts from

	// inUse is held (read) by whoever works on the current Snapshot (the
	// handler, a VMM write); uninstall takes it to wait for them, so the
	// caller may reuse the Snapshot's buffer once Wait returns.
	inUse sync.RWMutex

	faults     atomic.Uint64 // pages copied by a write fault (handler)
	vmmWrites  atomic.Uint64 // pages copied by a VMM write (accessor)
	armFaults  atomic.Uint64 // armed pages written before the cut
	handlerErr atomic.Pointer[error]
}

// NewProtector checks on a scratch page that a protected page's write is
// reported and let through once un-protected, opens a userfaultfd,
// registers mem with it in write-protect mode, and starts the fault
// handler. An error wraps ErrNoWriteProtect when the host lacks the
// feature.
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
		p.armBits = append(p.armBits, make([]uint64, r.BitmapWords()))
		p.touched = append(p.touched, make([]uint64, r.BitmapWords()))
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

// probeWriteProtect protects a page of a scratch mapping, has the kernel
// write it (a read(2) from a pipe into it, as KVM writes guest memory on
// a vCPU's behalf) and checks that the fault is reported and the write
// completes once the page is un-protected: some kernels accept the ioctls
// and still never report the fault. (A goroutine's own store would do
// less well: the runtime's preemption signals interrupt its wait on the
// fault again and again, each time taking its report back.)
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
	var pipe [2]int
	if err := unix.Pipe2(pipe[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("probe write-protect: pipe: %w", err)
	}
	defer unix.Close(pipe[0])
	defer unix.Close(pipe[1])
	if _, err := unix.Write(pipe[1], []byte{2}); err != nil {
		return fmt.Errorf("probe write-protect: pipe: %w", err)
	}
	addr := hostAddr(b)
	if err := u.register(addr, PageSize); err != nil {
		return err
	}
	defer u.unregister(addr, PageSize)
	if err := u.protect(addr, PageSize, true, false); err != nil {
		return fmt.Errorf("%w: UFFDIO_WRITEPROTECT: %v", ErrNoWriteProtect, err)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := unix.Read(pipe[0], b[1:2])
		wrote <- err
	}()
	fds := []unix.PollFd{{Fd: int32(u.fd), Events: unix.POLLIN}}
	msgs := make([]uffdMsg, 1)
	reported := false
	for deadline := time.Now().Add(5 * time.Second); !reported && time.Now().Before(deadline); {
		if _, err := unix.Poll(fds, 100); err != nil && !errors.Is(err, unix.EINTR) {
			break
		}
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
	case err := <-wrote:
		if err != nil {
			return fmt.Errorf("%w: the kernel's write to a protected page failed: %v", ErrNoWriteProtect, err)
		}
	case <-time.After(5 * time.Second):
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
		if err := p.fault(uintptr(m.Address)); err != nil {
			return err
		}
	}
	return nil
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
// and un-protected, a page the current snapshot still needs is copied
// first (and un-protected), an armed page the snapshot does not need is
// un-protected. For a fault (rather than a VMM write about to happen) any
// other page is un-protected too: the fault may be stale, or the page
// protected by an earlier failure; un-protecting a writable page is
// harmless. It reports whether it copied the page. The caller holds inUse
// (read): the snapshot it finds stays current meanwhile.
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
		if p.armBits[r.Slot][w]&bit != 0 && p.touched[r.Slot][w]&bit == 0 {
			p.touched[r.Slot][w] |= bit
			p.armFaults.Add(1)
			_ = p.u.protect(addr, PageSize, false, false)
		} else if fault {
			_ = p.u.wake(addr, PageSize)
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

// Arm write-protects the pages the last snapshot held, with the guest
// running, ahead of the Begin that follows (see "Arming" above). Without
// a last snapshot it does nothing.
func (p *Protector) Arm() error {
	if p.last == nil {
		return nil
	}
	p.armMu.Lock()
	for k := range p.armBits {
		copy(p.armBits[k], p.last.want[k])
		clear(p.touched[k])
	}
	p.armed = true
	p.armMu.Unlock()
	p.mem.wp.Store(p)
	for k, r := range p.mem.regions {
		err := bitRuns(p.armBits[k], 1<<30, func(pg, n uint64) error {
			return p.u.protect(p.bases[k]+uintptr(pg*PageSize), uintptr(n*PageSize), true, false)
		})
		if err != nil {
			p.Disarm()
			return fmt.Errorf("arm write-protection of region %#x: %w", uint64(r.GPA), err)
		}
	}
	return nil
}

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

// Snapshot is one set of pages being copied out of guest memory.
type Snapshot struct {
	p    *Protector
	want [][]uint64 // per region: the pages
	rank [][]int32  // per region and word: the pages before it (all regions)
	free [][]uint64 // per region: armed pages outside the set, let go after the copy
	n    int
	dst  []byte
	gen  uint64
	// progress: every page below copiedTo is in dst.
	copiedTo atomic.Int64
	mu       sync.Mutex
	cond     *sync.Cond
	finished chan struct{}
	err      error
	doneAt   time.Time
	protects int
}

// Begin write-protects the pages of set, to be copied into dst in address
// order (PageSize bytes per page: Count of them). Call it with the guest
// stopped: from then on a write to one of the pages waits until it is
// copied. Then resume the guest and call Snapshot.Copy. The previous
// Snapshot must have finished. After Arm, only what Arm did not protect
// (or what was written since) is protected here.
func (p *Protector) Begin(set PageBitmap, dst []byte) (*Snapshot, error) {
	if e := p.handlerErr.Load(); e != nil {
		p.Disarm()
		return nil, fmt.Errorf("write-protect fault handler: %w", *e)
	}
	p.gen++
	s := &Snapshot{p: p, dst: dst, gen: p.gen, finished: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	if l := p.last; l != nil && len(l.want) == len(p.mem.regions) {
		// Reuse the bitmaps of the last (finished) snapshot: Arm has
		// taken its prediction from them already.
		s.want, s.rank, s.free = l.want, l.rank, l.free
		l.want, l.rank, l.free = nil, nil, nil
	}
	if s.want == nil {
		for _, r := range p.mem.regions {
			s.want = append(s.want, make([]uint64, r.BitmapWords()))
			s.rank = append(s.rank, make([]int32, r.BitmapWords()))
			s.free = append(s.free, make([]uint64, r.BitmapWords()))
		}
	}
	p.armMu.Lock()
	defer p.armMu.Unlock()
	armed := p.armed
	var err error
	for k := range p.mem.regions {
		src := set.Words(k)
		want, rank, free := s.want[k], s.rank[k], s.free[k]
		for w := range want {
			var v uint64
			if w < len(src) {
				v = src[w]
			}
			want[w] = v
			rank[w] = int32(s.n)
			s.n += bits.OnesCount64(v)
			free[w] = 0
			if armed {
				protected := p.armBits[k][w] &^ p.touched[k][w]
				free[w] = protected &^ v
				v &^= protected // already protected
			}
			// v: the pages to protect now, in runs within the word and
			// across words (contiguous bits at word edges join).
			p.armBits[k][w] = v // scratch: the pages protected here
		}
		if err == nil {
			err = bitRuns(p.armBits[k], 1<<30, func(pg, n uint64) error {
				s.protects++
				return p.u.protect(p.bases[k]+uintptr(pg*PageSize), uintptr(n*PageSize), true, false)
			})
		}
	}
	p.armed = false
	if err == nil && len(dst) < s.n*PageSize {
		err = fmt.Errorf("snapshot of %d pages: buffer of %d bytes too small", s.n, len(dst))
	}
	if err != nil {
		// Un-protect everything this snapshot or Arm may have protected.
		for k, r := range p.mem.regions {
			_ = p.u.protect(p.bases[k], uintptr(r.Size), false, false)
		}
		p.mem.wp.CompareAndSwap(p, nil)
		p.last = nil // its bitmaps went to s: nothing to predict from
		return nil, fmt.Errorf("write-protect %d pages: %w", s.n, err)
	}
	if len(p.state) < s.n {
		p.state = make([]atomic.Uint64, s.n+s.n/4)
	}
	p.last = s
	p.mem.snap.Store(s)
	p.mem.wp.Store(p)
	return s, nil
}

// Len is the number of pages in the snapshot.
func (s *Snapshot) Len() int { return s.n }

// Protects is the number of UFFDIO_WRITEPROTECT calls Begin made (one per
// run of contiguous pages it had to protect).
func (s *Snapshot) Protects() int { return s.protects }

// bitRuns calls fn for each run of set bits in bm (page pg, n pages),
// runs joining across words, split at max pages.
func bitRuns(bm []uint64, max uint64, fn func(pg, n uint64) error) error {
	var start, n uint64
	emit := func() error {
		for n > 0 {
			m := min(n, max)
			if err := fn(start, m); err != nil {
				return err
			}
			start, n = start+m, n-m
		}
		return nil
	}
	for w, v := range bm {
		for v != 0 {
			b := uint64(bits.TrailingZeros64(v))
			ones := uint64(bits.TrailingZeros64(^(v >> b))) // 64 when v is all ones
			pg := uint64(w)*64 + b
			if n > 0 && start+n == pg {
				n += ones
			} else {
				if err := emit(); err != nil {
					return err
				}
				start, n = pg, ones
			}
			if b+ones == 64 {
				v = 0
			} else {
				v &^= (uint64(1)<<ones - 1) << b
			}
		}
	}
	return emit()
}

// index finds page pg of region r in the snapshot.
func (s *Snapshot) index(r *Region, pg uint64) (int, bool) {
	w, b := pg/64, pg%64
	v := s.want[r.Slot][w]
	if v&(1<<b) == 0 {
		return 0, false
	}
	return int(s.rank[r.Slot][w]) + bits.OnesCount64(v&(1<<b-1)), true
}

// take makes sure page pg of r, the snapshot's page i, is in dst and
// un-protected: it claims and copies it, or waits for whoever claimed it.
// It reports whether it copied it.
func (s *Snapshot) take(r *Region, pg uint64, i int) bool {
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
		s.copyPage(r, pg, i)
		if err := s.p.u.protect(s.p.bases[r.Slot]+uintptr(pg*PageSize), PageSize, false, false); err != nil {
			s.p.fail(fmt.Errorf("un-protect page %#x: %w", uint64(r.GPA)+pg*PageSize, err))
		}
		st.Store(copied(s.gen))
		return true
	}
}

func (s *Snapshot) copyPage(r *Region, pg uint64, i int) {
	copy(s.dst[i*PageSize:(i+1)*PageSize], r.Host[pg*PageSize:(pg+1)*PageSize])
}

func (s *Snapshot) claim(i int) bool {
	st := &s.p.state[i]
	v := st.Load()
	return v != claimed(s.gen) && v != copied(s.gen) && st.CompareAndSwap(v, claimed(s.gen))
}

// copyBatch bounds the pages the copier copies before un-protecting them
// and reporting progress: a writer that faults on a page the copier has
// claimed waits for at most this many page copies.
const copyBatch = 64

// Copy copies every page not yet copied into dst, in order, un-protecting
// each run of pages once copied, then lets go of the armed pages outside
// the set; Pages and Wait follow its progress. Run it once, after the
// guest has resumed (on a goroutine of its own to overlap with sending).
func (s *Snapshot) Copy() {
	err := s.copyAll()
	if err == nil {
		for k := range s.want {
			if err = bitRuns(s.free[k], 1<<30, func(pg, n uint64) error {
				return s.p.u.protect(s.p.bases[k]+uintptr(pg*PageSize), uintptr(n*PageSize), false, false)
			}); err != nil {
				break
			}
		}
	}
	if err == nil {
		if e := s.p.handlerErr.Load(); e != nil {
			err = fmt.Errorf("write-protect fault handler: %w", *e)
		}
	}
	if err != nil {
		s.p.fail(err)
	}
	s.p.mem.snap.CompareAndSwap(s, nil)
	s.p.mem.wp.CompareAndSwap(s.p, nil)
	s.p.inUse.Lock()
	s.p.inUse.Unlock() //nolint:staticcheck // empty: waits for the faults and VMM writes working on s
	s.mu.Lock()
	s.err = err
	s.doneAt = time.Now()
	s.cond.Broadcast()
	s.mu.Unlock()
	close(s.finished)
}

func (s *Snapshot) copyAll() error {
	i := 0
	msgs := make([]uffdMsg, 16)
	for k, r := range s.p.mem.regions {
		base := s.p.bases[k]
		err := bitRuns(s.want[k], copyBatch, func(pg, n uint64) error {
			// Claim and copy what no fault has claimed; un-protect the
			// sub-runs this copier copied.
			for x := uint64(0); x < n; {
				if !s.claim(i + int(x)) {
					x++
					continue
				}
				e := x + 1
				for e < n && s.claim(i+int(e)) {
					e++
				}
				for y := x; y < e; y++ {
					s.copyPage(r, pg+y, i+int(y))
				}
				if err := s.p.u.protect(base+uintptr((pg+x)*PageSize), uintptr((e-x)*PageSize), false, false); err != nil {
					return fmt.Errorf("un-protect %d pages at %#x: %w", e-x, uint64(r.GPA)+(pg+x)*PageSize, err)
				}
				for y := x; y < e; y++ {
					s.p.state[i+int(y)].Store(copied(s.gen))
				}
				x = e
			}
			// Pages a fault claimed are copied in a moment.
			for y := 0; y < int(n); y++ {
				for s.p.state[i+y].Load() != copied(s.gen) {
					runtime.Gosched()
				}
			}
			i += int(n)
			if err := s.p.drain(msgs); err != nil {
				return err
			}
			s.mu.Lock()
			s.copiedTo.Store(int64(i))
			s.cond.Broadcast()
			s.mu.Unlock()
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// Pages calls fn with each page of the snapshot in address order, as soon
// as it is copied, with its bytes as of Begin (valid until the next
// Begin).
func (s *Snapshot) Pages(fn func(gpa GPA, page []byte) error) error {
	i := 0
	for k, r := range s.p.mem.regions {
		for w, v := range s.want[k] {
			for v != 0 {
				b := bits.TrailingZeros64(v)
				v &= v - 1
				if err := s.wait(i); err != nil {
					return err
				}
				gpa := r.GPA + GPA((uint64(w)*64+uint64(b))*PageSize)
				if err := fn(gpa, s.dst[i*PageSize:(i+1)*PageSize]); err != nil {
					return err
				}
				i++
			}
		}
	}
	return nil
}

// wait waits until page i is copied.
func (s *Snapshot) wait(i int) error {
	if s.copiedTo.Load() > int64(i) {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.copiedTo.Load() <= int64(i) && s.err == nil {
		s.cond.Wait()
	}
	return s.err
}

// Wait waits until Copy has finished: every page copied and un-protected.
// It returns when that was, and why the snapshot cannot be trusted, if it
// cannot.
func (s *Snapshot) Wait() (time.Time, error) {
	<-s.finished
	return s.doneAt, s.err
}
