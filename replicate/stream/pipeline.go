package stream

import (
	"encoding/binary"
	"unsafe"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// pipeDepth is how many Pages frames a Sender keeps: one being filled by
// the checkpoint goroutine, the others being sealed and written by the
// sealer or waiting for it.
const pipeDepth = 3

// pipeline overlaps building a checkpoint's Pages frames with sending
// them: while the checkpoint goroutine copies pages into one slot, tests
// them for zero, checksums and compresses the section, the sealer
// goroutine seals (AES-256-GCM) and writes the frames of the others, on
// the other core where there is one. Frames leave in the order they were
// handed over; every other frame of the checkpoint goroutine (Begin,
// Disk, State, End) goes out directly once the frames handed over before
// it are written (flushAll), so the wire order is the call order, and
// EndCheckpoint returns, as before, with the whole checkpoint written.
// An unkeyed session's section of references (SendStablePage) skips the
// sealer: once the frames handed over before it are out, the checkpoint
// goroutine sums and writes it itself (flushRefs). A keyed session's
// goes to the sealer like any other, which seals it in parts from where
// its pages lie (sendSealedRefs).
//
// A slot belongs to the checkpoint goroutine while it is fill, then to the
// sealer from its hand-over on jobs until it comes back on free.
type pipeline struct {
	slots [pipeDepth]pageSlot
	fill  int      // the slot being filled
	jobs  chan int // slots handed to the sealer, in order
	free  chan int // slots the sealer is done with
	// sealerDone is closed when the sealer has returned: a call that
	// fails with the stream waits for it (sealerGone), so that no page a
	// section references is still being written when it returns.
	sealerDone chan struct{}
}

// pageSlot is one Pages frame: the section, its codec and what goes on
// the wire (the section framed in place, or the codec's buffer); or,
// when refs is not 0, a grouped section (container.SectionGrouped) whose
// pages stay where they lie (SendStablePage): meta holds the frame's
// Pages header, the section's count and flags, each entry's header and
// the padding to the data (its capacity fixed, so never moved); pieces
// the payload, meta then each page, in order (pieces[0] is meta's once
// closeRefs has filled it in); raw counts the pages, size the section's
// bytes. sums has a piece's PageSum where its caller gave one
// (SendSummedPage), nil for the rest; unsummed counts the pages without
// one: with none the End sum is taken from the sums (sum64.SectionSummed)
// instead of reading the pages. iov is what goes to writev: pieces,
// with pages that lie back to back in memory joined (joinPiece).
type pageSlot struct {
	pages container.PageSection
	pc    *pageCodec
	wire  []byte

	refs     int
	raw      int
	meta     []byte
	pieces   [][]byte
	sums     []*guestmem.PageSum
	unsummed int
	size     int
	iov      [][]byte
	runs     []int    // index in pieces of each run's first page (a run: pages between zero pages)
	gap      bool     // a zero page came since the last page with data
	parts    [][]byte // sendSealedRefs': each run's pages in one piece
	gather   []byte   // a keyed session's runs whose pages do not lie back to back
	gathered int      // pages gathered so far, over the slot's life (for tests)
}

// reset empties the slot for the next section.
func (sl *pageSlot) reset() {
	sl.pages.Reset()
	// no page (or PageSum) outlives its checkpoint here.
	sl.refs, sl.raw, sl.size, sl.unsummed = 0, 0, 0, 0
	clear(sl.pieces)
	sl.pieces = append(sl.pieces[:0], nil) // meta's, at closeRefs
	clear(sl.sums)
	sl.sums = append(sl.sums[:0], nil)
	clear(sl.iov)
	sl.iov = sl.iov[:0]
	sl.runs, sl.gap = sl.runs[:0], false
	clear(sl.parts)
	sl.parts = sl.parts[:0]
	if sl.meta == nil {
		sl.meta = make([]byte, 0, pagesHeader+container.GroupedDataOffset(MaxPagesPerFrame))
	}
	sl.meta = append(sl.meta[:0], make([]byte, pagesHeader+4)...)
}

// addRef adds the page at gpa without copying it: its entry's header to
// meta, and, unless it is a zero page, page itself to the pieces with
// its PageSum if it has one (ps; nil if not).
func (sl *pageSlot) addRef(gpa uint64, page []byte, zero bool, ps *guestmem.PageSum) {
	if zero {
		sl.meta = container.AppendEntryHeader(sl.meta, gpa, container.EncZero, 0)
		sl.gap = true
	} else {
		sl.meta = container.AppendEntryHeader(sl.meta, gpa, container.EncRaw, PageSize)
		if len(sl.pieces) == 1 || sl.gap {
			sl.runs = append(sl.runs, len(sl.pieces))
			sl.gap = false
		}
		sl.pieces = append(sl.pieces, page)
		sl.sums = append(sl.sums, ps)
		if ps == nil {
			sl.unsummed++
		}
		sl.raw++
	}
	sl.refs++
}

// closeRefs ends a section of references: meta gets its padding to the
// data (zeros), the Pages header (stored), the section's count and
// flags, and becomes the first piece; iov is made from the pieces.
func (sl *pageSlot) closeRefs() {
	head := container.GroupedDataOffset(sl.refs)
	sl.meta = append(sl.meta, make([]byte, pagesHeader+head-len(sl.meta))...)
	sl.size = head + sl.raw*PageSize
	putPagesHeader(sl.meta[:0], codecStored, sl.size)
	binary.LittleEndian.PutUint16(sl.meta[pagesHeader:], uint16(sl.refs))
	binary.LittleEndian.PutUint16(sl.meta[pagesHeader+2:], container.SectionGrouped)
	sl.pieces[0] = sl.meta
	for _, p := range sl.pieces {
		sl.iov = joinPiece(sl.iov, p)
	}
}

// joinPiece appends p (unless it is empty) to iov, joined to the last
// piece where p lies right behind it in the same array (staged pages,
// copied one after the other), so that a run of them costs writev one
// iovec: the kernel's copy pays for each. Sending 4 MB (split, 1,000
// pages in 1 MiB writevs, a throwaway harness beside the bench's ends)
// took 1.07× the sender's time of 1 MiB pieces with each page an iovec,
// 1.18× with a 16-byte header between each two pages.
func joinPiece(iov [][]byte, p []byte) [][]byte {
	if len(p) == 0 {
		return iov
	}
	if n := len(iov); n > 0 && follows(iov[n-1], p) {
		iov[n-1] = iov[n-1][:len(iov[n-1])+len(p)]
		return iov
	}
	return append(iov, p)
}

// follows says whether p lies right behind last, in the same array
// (within last's capacity), so that last[:len(last)+len(p)] is both.
func follows(last, p []byte) bool {
	free := last[len(last):cap(last)]
	return len(free) >= len(p) && unsafe.SliceData(free) == unsafe.SliceData(p)
}

// startPipeline readies the slots and starts the sealer (after the
// handshake: it writes session frames).
func (s *Sender) startPipeline() {
	s.jobs, s.free = make(chan int, pipeDepth), make(chan int, pipeDepth)
	s.sealerDone = make(chan struct{})
	for i := range s.slots {
		s.slots[i].pages.Headroom = pagesHeader // a stored section goes out in place
		s.slots[i].reset()
		if i != s.fill {
			s.free <- i
		}
	}
	s.wg.Add(1)
	go s.sealLoop()
}

// filling is the slot the checkpoint goroutine fills.
func (s *Sender) filling() *pageSlot { return &s.slots[s.fill] }

// handOver passes the filled slot to the sealer and takes a free one
// (waiting for the sealer if all are in flight). It returns the stream's
// failure, if any: a frame that failed to go out fails the stream.
func (s *Sender) handOver() error {
	if s.Err() != nil {
		return s.sealerGone()
	}
	s.jobs <- s.fill // never blocks: at most pipeDepth slots are out
	select {
	case s.fill = <-s.free:
	case <-s.done:
		return s.sealerGone()
	}
	s.filling().reset()
	if s.Err() != nil {
		return s.sealerGone()
	}
	return nil
}

// sealerGone waits for the sealer to return once the stream has failed,
// and returns the failure: the sealer may have been writing a frame from
// pages that SendStablePage's caller gets back when the call returns.
func (s *Sender) sealerGone() error {
	<-s.done
	<-s.sealerDone
	return s.err
}

// flushAll sends the section being filled, if any, and waits until the
// sealer has written every frame handed to it.
func (s *Sender) flushAll() error {
	if err := s.flushPages(); err != nil {
		return err
	}
	return s.waitSealer()
}

// waitSealer waits until the sealer has written every frame handed to
// it.
func (s *Sender) waitSealer() error {
	var held [pipeDepth]int
	for n := range pipeDepth - 1 {
		select {
		case held[n] = <-s.free:
		case <-s.done:
			return s.sealerGone()
		}
	}
	for _, i := range held[:pipeDepth-1] {
		s.free <- i
	}
	return s.Err()
}

// sealLoop is the sealer: it writes the frames handed to it, in order,
// until the stream ends. After a failure it only returns the slots.
func (s *Sender) sealLoop() {
	defer s.wg.Done()
	defer close(s.sealerDone)
	for {
		select {
		case i := <-s.jobs:
			if s.Err() == nil {
				_ = s.sendSlot(&s.slots[i]) // a failure fails the stream
			}
			s.free <- i
		case <-s.done:
			return
		}
	}
}

// sendSlot writes sl's Pages frame: its wire bytes, or, for a keyed
// session's section of references, the section sealed from where its
// pages lie (sendSealedRefs).
func (s *Sender) sendSlot(sl *pageSlot) error {
	if sl.refs > 0 {
		return s.sendSealedRefs(sl)
	}
	return s.send(framePages, sl.wire, false)
}

// sendSealedRefs writes a keyed session's section of references (closed:
// closeRefs) sealed in parts (frameWriter.writeSealedParts): its Pages
// header and the section up to its data, then each run of pages between
// zero pages (sealedParts), so that AES-GCM reads the pages where they
// lie instead of a copy of them. A run whose pages do not lie back to
// back (staged apart) is gathered into the slot's own buffer first; a
// section of zero pages alone is one part.
func (s *Sender) sendSealedRefs(sl *pageSlot) error {
	head := sl.pieces[0]
	if sl.raw == 0 {
		return s.send(framePages, head, false)
	}
	sl.parts, sl.gather = sl.parts[:0], sl.gather[:0]
	for i, start := range sl.runs {
		end := len(sl.pieces)
		if i+1 < len(sl.runs) {
			end = sl.runs[i+1]
		}
		sl.parts = append(sl.parts, sl.runPiece(sl.pieces[start:end]))
	}
	return s.sendParts(head, sl.parts, pagesHeader+sl.size)
}

// runPiece returns the pages of run (pieces, in entry order) as one
// slice: where they lie, if that is back to back, else gathered.
func (sl *pageSlot) runPiece(run [][]byte) []byte {
	whole := run[0]
	for _, p := range run[1:] {
		if !follows(whole, p) {
			whole = nil
			break
		}
		whole = whole[:len(whole)+len(p)]
	}
	if whole != nil {
		return whole
	}
	if sl.gather == nil { // only where a caller's pages lie apart
		sl.gather = make([]byte, 0, MaxPagesPerFrame*PageSize)
	}
	start := len(sl.gather)
	sl.gathered += len(run)
	for _, p := range run {
		sl.gather = append(sl.gather, p...) // within its capacity: never moved
	}
	return sl.gather[start:]
}
