package guestmem

import (
	"fmt"
	"math/bits"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Snapshot is one set of pages being copied out of guest memory.
type Snapshot struct {
	p    *Protector
	want [][]uint64 // per region: the pages
	rank [][]int32  // per region and word: the pages before it (all regions)
	free [][]uint64 // per region: armed pages outside the set, let go after the copy
	n    int
	dst  []byte
	sums []PageSum // nil, or each page's PageSum (BeginSummed), written by its copy with it
	gen  uint64
	// progress: every page below copiedTo is in dst (and its sum in sums).
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
	return p.begin(set, dst, nil)
}

// BeginSummed is Begin for a snapshot whose copies also sum each page
// (CopyPageSummed) into sums, one PageSum per page in dst's order
// (SummedPages hands them out with the pages).
func (p *Protector) BeginSummed(set PageBitmap, dst []byte, sums []PageSum) (*Snapshot, error) {
	return p.begin(set, dst, sums)
}

func (p *Protector) begin(set PageBitmap, dst []byte, sums []PageSum) (*Snapshot, error) {
	if e := p.handlerErr.Load(); e != nil {
		p.Disarm()
		return nil, fmt.Errorf("write-protect fault handler: %w", *e)
	}
	p.gen++
	s := &Snapshot{p: p, dst: dst, sums: sums, gen: p.gen, finished: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	s.takeBitmaps(p)
	// The VMM's writes wait (Memory.writing) until the snapshot is in
	// place: a write that follows finds it, and copies what it needs
	// first; devices are quiesced in the pause anyway.
	p.mem.writing.Lock()
	defer p.mem.writing.Unlock()
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
				// Armed pages outside the set are let go after the copy,
				// touched or not: a write may have touched one between
				// its marking and its protection by Arm, leaving it
				// protected (a touched page is written before the cut,
				// so it is in the set anyway, but this does not rely on
				// that).
				free[w] = p.armBits[k][w] &^ v
				v &^= p.armBits[k][w] &^ p.touched[k][w] // already protected
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
	if err == nil && sums != nil && len(sums) < s.n {
		err = fmt.Errorf("snapshot of %d pages: %d page sums too few", s.n, len(sums))
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
	p.forgot = false
	p.mem.snap.Store(s)
	p.mem.wp.Store(p)
	return s, nil
}

// takeBitmaps gives s the bitmaps of p's last (finished) snapshot, whose
// prediction Arm has taken already, or new ones.
func (s *Snapshot) takeBitmaps(p *Protector) {
	if l := p.last; l != nil && len(l.want) == len(p.mem.regions) {
		s.want, s.rank, s.free = l.want, l.rank, l.free
		l.want, l.rank, l.free = nil, nil, nil
		return
	}
	for _, r := range p.mem.regions {
		s.want = append(s.want, make([]uint64, r.BitmapWords()))
		s.rank = append(s.rank, make([]int32, r.BitmapWords()))
		s.free = append(s.free, make([]uint64, r.BitmapWords()))
	}
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
	dst, src := s.dst[i*PageSize:(i+1)*PageSize], r.Host[pg*PageSize:(pg+1)*PageSize]
	if s.sums != nil {
		CopyPageSummed(dst, src, &s.sums[i])
		return
	}
	copy(dst, src)
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
	return s.SummedPages(func(gpa GPA, page []byte, _ *PageSum) error { return fn(gpa, page) })
}

// SummedPages is Pages that also hands fn each page's PageSum, taken by
// its copy: from BeginSummed's sums, nil after Begin.
func (s *Snapshot) SummedPages(fn func(gpa GPA, page []byte, ps *PageSum) error) error {
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
				var ps *PageSum
				if s.sums != nil {
					ps = &s.sums[i]
				}
				if err := fn(gpa, s.dst[i*PageSize:(i+1)*PageSize], ps); err != nil {
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
