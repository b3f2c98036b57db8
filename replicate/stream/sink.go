package stream

import (
	"bytes"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"govmm/vmm/guestmem"
)

// Checkpoint is a verified checkpoint, as handed to Config.OnCommit.
type Checkpoint struct {
	Epoch     uint64
	Kind      Kind
	Pages     uint64 // pages staged in the sink, ZeroPages of them zero
	ZeroPages uint64
	DiskBytes uint64 // bytes written (or zeroed) by the Disk frames staged in Config.Disks
	// State is the encoded machine state, opaque to the stream (nil if
	// the checkpoint carried none). It is the callee's only until
	// OnCommit returns: the receiver gathers the next checkpoint's state
	// in the same buffer, so a callee that keeps it copies it.
	State []byte
}

// PageSink receives the pages of each checkpoint from the Receiver's Run
// goroutine, one checkpoint at a time: Begin, StagePage..., then
// Commit (the checkpoint verified and OnCommit accepted it) or Abort
// (anything else, including a stream that dies mid-checkpoint). A sink
// must not make a checkpoint's pages visible before Commit, except where
// nothing resumable can be damaged (see StagingSink).
type PageSink interface {
	// Begin starts a checkpoint.
	Begin(epoch uint64, kind Kind) error
	// StagePage stages the PageSize bytes of the page at gpa; data nil
	// means an all-zero page. data is valid only during the call. gpa is
	// already checked against the sender's layout.
	StagePage(gpa GPA, data []byte) error
	// Commit makes the staged pages current. It is the point of no return:
	// it must not fail for anything the stream could have sent, and if it
	// fails the receiver's memory is unusable.
	Commit() error
	// Abort discards the staged pages.
	Abort()
}

// DiskSink receives the disk writes of each checkpoint from the
// Receiver's Run goroutine, beside the PageSink and with the same
// protocol: Begin, StageWrite..., then Commit (after OnCommit accepted the
// checkpoint, before the page sink commits and before the ack) or Abort.
// Like a PageSink, it must not make a checkpoint's writes visible before
// Commit, except where nothing resumable can be damaged (initial sync).
type DiskSink interface {
	// Begin starts a checkpoint.
	Begin(epoch uint64, kind Kind) error
	// StageWrite stages data (valid only during the call) at off on disk
	// number disk. disk is below MaxDisks; the sink checks it and the
	// range against its disks.
	StageWrite(disk int, off int64, data []byte) error
	// StageZero stages n zero bytes at off on disk number disk (a zero
	// run: the sender's disk reads as zeros there), in order with the
	// writes, checked as StageWrite checks them.
	StageZero(disk int, off, n int64) error
	// Commit applies the staged writes durably (synced). If it fails, the
	// receiver's disks are unusable.
	Commit() error
	// Abort discards the staged writes.
	Abort()
}

var zeroPage [PageSize]byte

// zeroChunk backs the zero runs of Disk frames.
var zeroChunk [MaxDiskChunk]byte

// MemSink is a PageSink that keeps everything in maps: the simple default,
// for tests and tools. Safe for concurrent readers.
type MemSink struct {
	mu        sync.Mutex // guards the fields below
	staged    map[GPA][]byte
	committed map[GPA][]byte
	epoch     uint64
}

var _ PageSink = (*MemSink)(nil)

// NewMemSink returns an empty MemSink.
func NewMemSink() *MemSink {
	return &MemSink{staged: map[GPA][]byte{}, committed: map[GPA][]byte{}}
}

// Begin implements PageSink.
func (s *MemSink) Begin(epoch uint64, kind Kind) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.staged)
	return nil
}

// StagePage implements PageSink.
func (s *MemSink) StagePage(gpa GPA, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if data == nil {
		data = zeroPage[:]
	}
	s.staged[gpa] = bytes.Clone(data)
	return nil
}

// Commit implements PageSink.
func (s *MemSink) Commit() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for gpa, p := range s.staged {
		s.committed[gpa] = p
	}
	clear(s.staged)
	return nil
}

// Abort implements PageSink.
func (s *MemSink) Abort() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.staged)
}

// PageWriter is guest memory as a sink writes to it; *guestmem.Memory is
// one. A StagingSink calls WriteAt from several goroutines at once when it
// commits a large checkpoint, never on the same page at once.
type PageWriter interface {
	WriteAt(p []byte, gpa GPA) error
}

// ntWriter is memory that can take bytes nobody reads soon with
// non-temporal stores (*guestmem.Memory is one, WriteAtNT): a
// StagingSink writes with it wherever it writes Dest, since nothing
// reads a replica's memory, or a migration destination's, until the
// guest resumes there. It copied 4,096 pages in 0.53-0.61 of the time
// at scattered addresses or in a harvest's ascending order with gaps,
// and 1.07 of it at consecutive ones (guestmem's BenchmarkWriteAtNT,
// bench/results/20261204T233359Z).
type ntWriter interface {
	WriteAtNT(p []byte, gpa GPA) error
}

// ntBatcher is memory that batches those non-temporal writes
// (*guestmem.Memory is one, NTWriter: the stores fenced, the lock taken
// and the pages marked once per 64 pages, not per page): a commit's
// apply writes through one. 4,096 pages went in 0.63-0.66 of
// WriteAtNT's time, and 0.35-0.37 of WriteAt's scattered or in a
// harvest's order, 0.69 consecutive (BenchmarkWriteAtNT,
// bench/results/20261205T013500Z).
type ntBatcher interface {
	NTWriter() *guestmem.NTWriter
}

// write is Dest's WriteAtNT where it has one, else its WriteAt.
func (s *StagingSink) write(p []byte, gpa GPA) error {
	if w, ok := s.Dest.(ntWriter); ok {
		return w.WriteAtNT(p, gpa)
	}
	return s.Dest.WriteAt(p, gpa)
}

// pageSlicer is memory a sink can read in place (*guestmem.Memory is
// one): a StagingSink whose Dest is one leaves a page that is zero
// already alone when a zero page comes for it, instead of writing 4 KiB
// of zeros. Fresh memory at a migration's destination stays untouched
// (unallocated), as QEMU's destination does with zero pages.
type pageSlicer interface {
	Slice(gpa GPA, n uint64) ([]byte, error)
}

// StagingSink stages pages and copies them into Dest on commit: the
// standby's staging buffer. A Receiver leaves it each Pages frame's own
// buffer until then (keepPage), so a page is copied once; pages handed to
// StagePage are copied into fixed-size chunks first. As long as no resumable checkpoint
// (KindEpoch, KindFinal) has been committed there is nothing in Dest to
// protect, so initial-sync pages go straight into Dest, sparing a second
// copy of the whole guest. Use it from one goroutine (the Receiver's).
//
// Commit applies a checkpoint of commitSplit pages or more on up to
// commitWorkers goroutines (one per core but one), each taking the pages whose
// page number falls to it, in staging order (a page staged twice is
// applied twice, in order, by one goroutine). A Receiver does not wait
// for that copy before it acknowledges (asyncCommitter): it commits the
// checkpoint (commitStart: the point of no return, every page staged in
// memory and bound for Dest), acks, and the copy runs while the ack
// travels, the primary goes on and the next checkpoint is staged (a
// second set of staging, stage beside app); the Receiver waits for it
// (settle) before it commits the next checkpoint, before a checkpoint
// that writes straight to Dest begins, and before Run returns, so
// checkpoints reach Dest in order and nothing reads Dest, or resumes
// the guest from it, before the copy is whole. As in Remus, the standby
// acknowledges a checkpoint once it holds all of it, and applies it
// after. The price of the overlap: while a checkpoint is applied and
// the next one staged, the standby holds both (twice the largest
// checkpoint's pages, at most). Every write into Dest goes around the
// cache where Dest can do that (ntWriter).
type StagingSink struct {
	Dest PageWriter

	resumable bool // a resumable checkpoint has been committed
	kind      Kind // of the checkpoint being staged
	direct    bool // this checkpoint writes straight to Dest

	stage staged // the checkpoint being staged
	// app is the committed checkpoint being applied, from commitStart
	// until settle: its workers read it and write Dest, and nothing else
	// touches it until settle has waited for them (then it is empty, and
	// the next commitStart swaps it with stage). mu guards done, which
	// tests wait on (waitApplied).
	app      staged
	applying bool
	errs     []error // per worker
	left     atomic.Int32
	mu       sync.Mutex
	done     chan struct{} // closed by the last worker
	lateErr  error         // an apply's failure that Abort waited for
}

// staged is one checkpoint's staging: its pages in order.
type staged struct {
	gpas []GPA
	data [][]byte // per staged page: its bytes (in chunks, or kept), nil for a zero page
	// chunks hold the staged bytes, stagingChunk pages each, kept across
	// checkpoints: no large reallocation while the stream is being read.
	chunks [][]byte
	used   int // pages of data staged
}

func (st *staged) reset() {
	clear(st.data) // no kept buffer outlives the checkpoint here
	st.gpas, st.data, st.used = st.gpas[:0], st.data[:0], 0
}

const stagingChunk = 256

var _ PageSink = (*StagingSink)(nil)

// Begin implements PageSink. The last checkpoint's apply may go on
// while this one is staged, unless this one writes straight to Dest.
func (s *StagingSink) Begin(epoch uint64, kind Kind) error {
	s.stage.reset()
	s.kind = kind
	s.direct = !s.resumable && kind == KindInitialSync
	if s.direct {
		return s.settle()
	}
	return nil
}

// rangeChecker is memory that says whether a range lies inside it
// (*guestmem.Memory is one): a StagingSink whose Dest is one refuses a
// page outside it as it is staged, before the checkpoint can commit and
// be acknowledged, so that the copy into Dest after the ack cannot fail
// for anything the stream sent.
type rangeChecker interface {
	Contains(gpa GPA, n uint64) bool
}

// checkRange refuses a page that does not lie inside Dest.
func (s *StagingSink) checkRange(gpa GPA) error {
	if rc, ok := s.Dest.(rangeChecker); ok && !rc.Contains(gpa, PageSize) {
		return fmt.Errorf("page %#x: outside guest memory: %w", uint64(gpa), ErrOutOfRange)
	}
	return nil
}

// StagePage implements PageSink.
func (s *StagingSink) StagePage(gpa GPA, data []byte) error {
	if s.direct {
		if data == nil {
			return s.writeZero(gpa, s.write)
		}
		return s.write(data, gpa)
	}
	if err := s.checkRange(gpa); err != nil {
		return err
	}
	st := &s.stage
	st.gpas = append(st.gpas, gpa)
	if data == nil {
		st.data = append(st.data, nil)
		return nil
	}
	c, i := st.used/stagingChunk, st.used%stagingChunk
	if c == len(st.chunks) {
		st.chunks = append(st.chunks, make([]byte, stagingChunk*PageSize))
	}
	b := st.chunks[c][i*PageSize : (i+1)*PageSize]
	copy(b, data)
	st.data = append(st.data, b)
	st.used++
	return nil
}

// keepPage implements keeper: data (nil for a zero page) stays valid until
// Commit or Abort, so it is staged without a copy, unless the checkpoint
// goes straight to Dest (then kept is false: Dest has it already).
func (s *StagingSink) keepPage(gpa GPA, data []byte) (kept bool, err error) {
	if s.direct {
		return false, s.StagePage(gpa, data)
	}
	if err := s.checkRange(gpa); err != nil {
		return false, err
	}
	s.stage.gpas = append(s.stage.gpas, gpa)
	s.stage.data = append(s.stage.data, data)
	return data != nil, nil
}

// keeper is a PageSink that can keep a page's bytes until Commit or Abort
// instead of copying them (StagingSink): the Receiver then hands it the
// frame's own buffer (a stored page section read and opened in place, or
// decompressed), and reads the next frames into other buffers until the
// checkpoint is committed or aborted. One copy of each page fewer.
type keeper interface {
	PageSink
	keepPage(gpa GPA, data []byte) (kept bool, err error)
}

var _ keeper = (*StagingSink)(nil)

// Commit implements PageSink: the staged pages are in Dest when it
// returns.
func (s *StagingSink) Commit() error {
	if err := s.commitStart(); err != nil {
		return err
	}
	return s.settle()
}

// asyncCommitter is a PageSink whose commit can end after the ack
// (StagingSink): commitStart commits the staged checkpoint, which can
// no longer fail for anything the stream sent, and starts applying it
// once the last one's apply is done (its failure is commitStart's);
// settle waits until it is applied (nil if nothing is being applied).
// Between the two the next checkpoint may be staged. applied says,
// without waiting, whether settle would return at once.
type asyncCommitter interface {
	PageSink
	commitStart() error
	settle() error
	applied() bool
}

var _ asyncCommitter = (*StagingSink)(nil)

// commitStart implements asyncCommitter: it waits for the last
// checkpoint's apply (a page this one stages too must land after it),
// then starts copying the staged pages into Dest, on up to commitWorkers
// goroutines for commitSplit pages or more, and returns.
func (s *StagingSink) commitStart() error {
	if err := s.settle(); err != nil {
		return err
	}
	s.stage, s.app = s.app, s.stage // settle left app empty
	n := 1
	if len(s.app.gpas) >= commitSplit {
		n = max(1, min(runtime.GOMAXPROCS(0)-1, commitWorkers))
	}
	s.errs = slices.Grow(s.errs[:0], n)[:n]
	clear(s.errs)
	done := make(chan struct{})
	s.mu.Lock()
	s.done = done
	s.mu.Unlock()
	s.applying = true
	s.left.Store(int32(n))
	for w := range n {
		go func() {
			s.errs[w] = s.apply(w, n)
			if s.left.Add(-1) == 0 {
				close(done)
			}
		}()
	}
	if s.kind.Resumable() {
		s.resumable = true
	}
	return nil
}

// applied implements asyncCommitter.
func (s *StagingSink) applied() bool { return !s.applying || s.left.Load() == 0 }

// settle implements asyncCommitter: it waits for the apply commitStart
// started, if any, empties what it applied, and returns the apply's
// failure (then Dest is unusable), or one that Abort waited for.
func (s *StagingSink) settle() error {
	err := s.lateErr
	s.lateErr = nil
	if !s.applying {
		return err
	}
	<-s.done
	s.applying = false
	s.app.reset()
	for _, e := range s.errs {
		if err == nil {
			err = e
		}
	}
	return err
}

// A copy into memory never takes every P: its workers run until they
// are done or preempted (10 ms), and a goroutine that the network wakes
// meanwhile (the reader, with the next checkpoint's bytes; in one
// process, the sender's ack reader) waits for a P to come free. With all
// of a 2-core host's Ps copying, an ack of 1,000 pages took a third
// longer to reach the sender, which waited for the copy to end.
const (
	commitSplit   = 256 // pages from which Commit uses more than one goroutine
	commitWorkers = 4   // at most, and one fewer than GOMAXPROCS
)

// apply writes the committed pages whose page number is w modulo n into
// Dest, through one NTWriter where Dest offers them.
func (s *StagingSink) apply(w, n int) error {
	write := s.write
	if b, ok := s.Dest.(ntBatcher); ok {
		nw := b.NTWriter()
		defer nw.Flush()
		write = nw.WriteAt
	}
	for i, gpa := range s.app.gpas {
		if n > 1 && int(uint64(gpa)/PageSize)%n != w {
			continue
		}
		var err error
		if d := s.app.data[i]; d == nil {
			err = s.writeZero(gpa, write)
		} else {
			err = write(d, gpa)
		}
		if err != nil {
			return fmt.Errorf("apply staged page %#x: %w", uint64(gpa), err)
		}
	}
	return nil
}

// Abort implements PageSink. An apply still running (the last committed
// checkpoint's) is waited for first; its failure comes back from the
// next Begin, Commit or settle.
func (s *StagingSink) Abort() {
	s.lateErr = s.settle()
	s.stage.reset()
}

// writeZero makes the page at gpa zero with write, writing only if it
// is not already.
func (s *StagingSink) writeZero(gpa GPA, write func([]byte, GPA) error) error {
	if sl, ok := s.Dest.(pageSlicer); ok {
		if b, err := sl.Slice(gpa, PageSize); err == nil && bytes.Equal(b, zeroPage[:]) {
			return nil
		}
	}
	return write(zeroPage[:], gpa)
}
