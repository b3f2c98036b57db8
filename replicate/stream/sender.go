package stream

import (
	"bytes"
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// Sender is the primary's (or migration source's) end of a stream.
//
// BeginCheckpoint, SendPage, SendDisk, SendState, EndCheckpoint and
// Handover belong to one goroutine, the lead's checkpoint loop. WaitAck,
// Acked, LastHeard, Stats, Err and Close may be called from any goroutine.
// The Sender runs four goroutines of its own: the ack reader, the
// heartbeat sender, the failure detector and the sealer (pipeline.go);
// Close waits for them.
type Sender struct {
	*endpoint

	// Owned by the checkpoint goroutine.
	scratch   [PageSize]byte // SendPage copies the page here first
	xor       [PageSize]byte // and XORs it with its shadow here
	open      atomic.Bool    // read by Close
	cur       endInfo        // epoch, pages, stateLen, diskBytes of the open checkpoint
	sum       sum64          // of the open checkpoint's sections
	kind      Kind
	lastEpoch uint64
	lastKind  Kind
	pipeline             // Pages frames: filled here, sealed and written by the sealer
	dbuf      []byte     // a Disk frame: codec header, then its section
	dc        *pageCodec // compresses Disk frames' sections (the session's codec)
	sc        *pageCodec // compresses State frames' chunks (the session's codec)
	xbuf      []byte     // a State frame's chunk XORed with the last state, or stored
	// lastState is the state of the last checkpoint that carried any, as
	// the receiver's reader holds it too (frameReader.trackState);
	// nextState the open checkpoint's so far; both kept only when the
	// session compresses, the only time a Sender XORs.
	lastState, nextState []byte

	amu     sync.Mutex    // guards acked, pending, ackedCh
	acked   uint64        // last acknowledged epoch
	pending []pendingAck  // ended, not yet acknowledged, in order
	ackedCh chan struct{} // closed and replaced at each ack

	// Polling for acks (Config.AckSpin, pollsForAck): ackHits is the
	// recent share of polled acks that came within the spin, in 1/1024ths
	// (a moving average, updated by the reader at each polled ack);
	// ackEnds counts the Ends that went out while it was too low to poll
	// (the checkpoint goroutine's).
	ackHits atomic.Int32
	ackEnds int
}

// pendingAck is a checkpoint ended and not yet acknowledged: its epoch,
// when its End went out, and whether the reader polls for its ack.
type pendingAck struct {
	epoch  uint64
	ended  time.Time
	polled bool
}

// pollsForAck's rule: the reader polls for an ack while at least
// ackMinHits/1024 of the recent polled acks came within the spin (each
// polled ack moves the average by 1/ackHitsWeight of the difference);
// below that, for one End in ackProbeEvery only, to notice when acks
// come sooner again.
const (
	ackMinHits    = 256 // a quarter
	ackHitsWeight = 8
	ackProbeEvery = 16
)

// Dial connects to a receiver at addr and runs the handshake.
func Dial(ctx context.Context, addr string, cfg Config) (*Sender, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial standby %s: %w", addr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true) // acks and heartbeats are latency-critical
	}
	return NewSender(ctx, conn, cfg)
}

// NewSender runs the handshake on conn as the sending end and waits for
// the receiver to accept the VM (its refusal comes back as the error). It
// takes ownership of conn, and closes it on failure.
func NewSender(ctx context.Context, conn net.Conn, cfg Config) (*Sender, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		conn.Close()
		return nil, err
	}
	if err := cfg.Identity.Validate(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: sender identity: %w", ErrConfig, err)
	}
	s := &Sender{
		endpoint: newEndpoint(conn, cfg),
		ackedCh:  make(chan struct{}),
	}
	if err := s.handshake(ctx, roleSender); err != nil {
		return nil, err
	}
	s.sendBuffer, s.rtt = tuneSendBuffer(conn, cfg.SendBuffer)
	s.startPipeline()
	if s.cr.enable(conn, cfg.AckSpin); s.cr.raw != nil {
		s.cr.ackDue = s.ackAwaited
		s.ackHits.Store(1024) // poll until acks show it does not pay
	}
	s.heard()
	s.log.Info("stream connected", "role", "sender", "vm", cfg.Identity.Name, "failover_timeout", s.timeout,
		"cipher", s.Cipher(), "rtt", s.rtt, "send_buffer", sendBufferName(s.sendBuffer))
	s.asyncReader = true
	s.wg.Add(1)
	go s.readLoop()
	s.startLiveness()
	return s, nil
}

// BeginCheckpoint opens checkpoint epoch of the given kind. Epochs must
// increase; kinds must not go down (initial-sync, epoch, final), and
// nothing may follow a final checkpoint.
//
// The Begin frame goes out at once (flushed), not with the first pages:
// a standby idle since the last checkpoint starts waking as soon as it
// is called, and package replicate calls it just before the pause that
// cuts the checkpoint, so that the standby wakes while the vCPUs stop and
// the pages are taken (docs/STREAM.md, "Begun before the pause").
func (s *Sender) BeginCheckpoint(epoch uint64, kind Kind) error {
	if err := s.Err(); err != nil {
		return err
	}
	switch {
	case s.open.Load():
		return fmt.Errorf("begin checkpoint %d: checkpoint %d still open: %w", epoch, s.cur.epoch, ErrProtocol)
	case epoch <= s.lastEpoch:
		return fmt.Errorf("begin checkpoint %d: epochs must increase (last %d): %w", epoch, s.lastEpoch, ErrProtocol)
	case kind < KindInitialSync || kind > KindFinal:
		return fmt.Errorf("begin checkpoint %d: unknown %v: %w", epoch, kind, ErrProtocol)
	case s.lastKind == KindFinal:
		return fmt.Errorf("begin checkpoint %d: the final checkpoint was sent: %w", epoch, ErrProtocol)
	case kind < s.lastKind:
		return fmt.Errorf("begin checkpoint %d: %v after %v: %w", epoch, kind, s.lastKind, ErrProtocol)
	}
	s.epoch.Store(epoch)
	if err := s.send(frameBegin, appendBegin(nil, epoch, kind), true); err != nil {
		return err
	}
	s.open.Store(true)
	s.kind, s.cur = kind, endInfo{epoch: epoch}
	s.nextState = s.nextState[:0]
	s.sum = newSum64()
	s.filling().reset()
	return nil
}

// SendPage adds the page at gpa (PageSize bytes, copied before return) to
// the open checkpoint. All-zero pages travel without bytes. Pages are
// batched into frames of up to MaxPagesPerFrame.
func (s *Sender) SendPage(gpa GPA, page []byte) error {
	if err := s.checkPage(gpa, page); err != nil {
		return err
	}
	if s.filling().refs > 0 { // a section of references goes first
		if err := s.flushPages(); err != nil {
			return err
		}
	}
	// Copy first: the guest may be writing the page while it is sent (a
	// pre-copy round), and the zero test and the bytes on the wire must
	// describe the same contents. Without deltas the copy is the
	// section's own.
	pages := &s.filling().pages
	if s.shadow == nil {
		if pages.AddCopy(uint64(gpa), page) {
			s.ctr.zeroPages.Add(1)
		}
		return s.added(pages.Len())
	}
	copy(s.scratch[:], page)
	switch s.shadow.encode(pages, gpa, s.scratch[:], s.xor[:]) { // delta.go
	case container.EncZero:
		s.ctr.zeroPages.Add(1)
	case container.EncXOR:
		s.ctr.deltaPages.Add(1)
	case container.EncCopy:
		s.ctr.copyPages.Add(1)
	}
	return s.added(pages.Len())
}

// SendStablePage is SendPage for a page whose bytes stay as they are,
// and in place, until this checkpoint's EndCheckpoint returns, a call
// returns the stream's failure, or Close returns: a staging buffer
// (package replicate's copy of the dirty pages). (A call refused for a
// local reason, a page outside the layout say, leaves the stream open,
// and pages already handed over may still be being read.) In a session
// that compresses its frames or ships deltas, it is SendPage. In the
// others (stored, whole pages) the page is not copied: its Pages frame
// goes out from where the pages lie (pageSlot), one copy of each page
// fewer on the primary; unkeyed written with writev, keyed sealed in
// parts (sealedParts), the pages read in place by AES-GCM.
func (s *Sender) SendStablePage(gpa GPA, page []byte) error {
	return s.sendStable(gpa, page, nil)
}

// SendSummedPage is SendStablePage for a stable page whose
// guestmem.PageSum the copy that made it took (guestmem.CopyPageSummed):
// where SendStablePage would not copy the page, the Sender tests it for
// zero and takes its share of the End sum from ps instead of reading it,
// and the kernel's copy into the socket is the first read of the page
// since that copy. ps must describe page's bytes and stay as it is for as
// long as page (a wrong one fails the checkpoint at the receiver, which
// sums what it reads: ErrChecksum). With ps nil, or where
// SendStablePage copies, it is SendStablePage.
func (s *Sender) SendSummedPage(gpa GPA, page []byte, ps *guestmem.PageSum) error {
	return s.sendStable(gpa, page, ps)
}

// sendStable is SendStablePage and SendSummedPage: ps nil, or the page's
// sums.
func (s *Sender) sendStable(gpa GPA, page []byte, ps *guestmem.PageSum) error {
	if s.codec != codecStored || s.shadow != nil {
		return s.SendPage(gpa, page)
	}
	if err := s.checkPage(gpa, page); err != nil {
		return err
	}
	if s.filling().pages.Len() > 0 { // a section of copies goes first
		if err := s.flushPages(); err != nil {
			return err
		}
	}
	sl := s.filling() // after any hand-over
	var zero bool
	if ps != nil {
		zero = !ps.NonZero
	} else {
		zero = bytes.Equal(page, zeroPage[:])
	}
	if zero {
		s.ctr.zeroPages.Add(1)
	}
	sl.addRef(uint64(gpa), page, zero, ps)
	return s.added(sl.refs)
}

// checkPage checks a page handed to SendPage or SendStablePage.
func (s *Sender) checkPage(gpa GPA, page []byte) error {
	switch {
	case !s.open.Load():
		return fmt.Errorf("send page %#x: no checkpoint open: %w", uint64(gpa), ErrProtocol)
	case len(page) != PageSize:
		return fmt.Errorf("send page %#x: %d bytes, want %d: %w", uint64(gpa), len(page), PageSize, ErrFrame)
	case !s.cfg.Identity.Contains(gpa):
		return fmt.Errorf("send page %#x: outside the memory layout or unaligned: %w", uint64(gpa), ErrOutOfRange)
	}
	return nil
}

// added counts the page just added to the section being filled, which
// now holds n pages, and hands the section over once it is full.
func (s *Sender) added(n int) error {
	s.ctr.pages.Add(1)
	s.cur.pages++
	if n == MaxPagesPerFrame {
		return s.flushPages()
	}
	return nil
}

// flushPages hands the page section being filled to the sealer as a
// Pages frame, compressed with the session's codec, and goes on with an
// empty one; the checksum covers the section itself, so that the
// receiver also checks what it decompressed.
func (s *Sender) flushPages() error {
	sl := s.filling()
	if sl.refs > 0 {
		sl.closeRefs()
		s.ctr.pageBytes.Add(uint64(sl.size))
		s.ctr.pageWireBytes.Add(uint64(pagesHeader + sl.size))
		if s.sealed {
			return s.handOver() // the sealer seals it from where its pages lie (sendSlot)
		}
		return s.flushRefs(sl)
	}
	if sl.pages.Len() == 0 {
		return nil
	}
	p := sl.pages.Payload()
	if sl.pc == nil {
		sl.pc = newPageCodec(s.codec)
	}
	sl.wire = sl.pc.encodeFramed(sl.pages.Framed())
	if s.summed(codec(sl.wire[0]) == codecStored) {
		s.sum.Section(container.TypePages, p)
	}
	s.ctr.pageBytes.Add(uint64(len(p)))
	s.ctr.pageWireBytes.Add(uint64(len(sl.wire)))
	return s.handOver()
}

// flushRefs sums and writes an unkeyed session's closed section of
// references (SendStablePage) on the checkpoint goroutine, once the frames handed to the sealer
// before it are out, and goes on with the slot emptied. It does not hand
// it to the sealer: there is nothing to seal or compress, and a second
// goroutine busy at once with the checkpoint kept the other core from
// the standby's reader where both ends share two (a third longer to ack
// 1,000 pages, docs/STREAM.md). The sum reads the pages just before the
// kernel copies them, which then finds them in cache; or, where every
// page came with its PageSum (SendSummedPage), it is taken from those
// and the headers, and no page is read but by the kernel's copy.
func (s *Sender) flushRefs(sl *pageSlot) error {
	if err := s.waitSealer(); err != nil {
		return err
	}
	head := sl.pieces[0]
	sl.pieces[0] = head[pagesHeader:] // the sum covers the section, not the Pages header
	if sl.unsummed > 0 || !s.sum.SectionSummed(container.TypePages, sl.size, sl.pieces, sl.sums) {
		s.sum.SectionPieces(container.TypePages, sl.size, sl.pieces)
	}
	sl.pieces[0] = head
	err := s.sendPieces(sl.iov, pagesHeader+sl.size)
	sl.reset()
	return err
}

// SendDisk adds a write of data at off on disk number disk to the open
// checkpoint, in frames of at most MaxDiskChunk bytes; all-zero pieces
// travel without bytes. A checkpoint's Disk frames cost at most
// MaxCheckpointDisk (frame.go, diskCost): checked up front as if every
// piece had data.
func (s *Sender) SendDisk(disk int, off int64, data []byte) error {
	if err := s.diskOpen(disk, off, int64(len(data)), uint64(len(data))); err != nil {
		return err
	}
	for len(data) > 0 {
		n := min(len(data), MaxDiskChunk)
		piece := data[:n]
		if bytes.Equal(piece, zeroChunk[:n]) {
			piece = nil
		}
		if err := s.diskFrame(disk, off, n, piece); err != nil {
			return err
		}
		data, off = data[n:], off+int64(n)
	}
	return nil
}

// SendDiskZero adds n zero bytes at off on disk number disk to the open
// checkpoint, as zero runs (frames without bytes): what a hole in the
// source's disk file reads as, or a range a guest discarded, sent without
// reading it. Each frame costs ZeroRunCost toward the checkpoint's
// MaxCheckpointDisk (ZeroCost(n) in all), not its length.
func (s *Sender) SendDiskZero(disk int, off, n int64) error {
	if err := s.diskOpen(disk, off, n, ZeroCost(n)); err != nil {
		return err
	}
	for n > 0 {
		c := int(min(n, MaxDiskChunk))
		if err := s.diskFrame(disk, off, c, nil); err != nil {
			return err
		}
		n, off = n-int64(c), off+int64(c)
	}
	return nil
}

// diskOpen checks a disk write of n bytes at off on disk, which costs at
// most cost, against the open checkpoint and sends the pages before it
// (so that the sum sees what the receiver sees).
func (s *Sender) diskOpen(disk int, off, n int64, cost uint64) error {
	if !s.open.Load() {
		return fmt.Errorf("send disk write: no checkpoint open: %w", ErrProtocol)
	}
	if disk < 0 || disk >= MaxDisks || off < 0 || n < 0 {
		return fmt.Errorf("send disk write: disk %d offset %d length %d: %w", disk, off, n, ErrOutOfRange)
	}
	if s.cur.diskCost+cost > MaxCheckpointDisk {
		return fmt.Errorf("send disk write: disk frames of the checkpoint would cost %d, at most %d: %w",
			s.cur.diskCost+cost, MaxCheckpointDisk, ErrTooLarge)
	}
	return s.flushAll()
}

// diskFrame sends one Disk frame of n bytes at off: piece, or a zero run
// if piece is nil. Its section is compressed with the session's codec as
// a Pages frame's is (version 12); a zero run's, 16 bytes, is stored.
func (s *Sender) diskFrame(disk int, off int64, n int, piece []byte) error {
	var head [pagesHeader]byte
	s.dbuf = container.AppendDisk(append(s.dbuf[:0], head[:]...), uint16(disk), uint64(off), n, piece)
	section := s.dbuf[pagesHeader:]
	if s.dc == nil {
		s.dc = newPageCodec(s.codec)
	}
	var wire []byte
	if piece == nil {
		wire = s.dc.stored(s.dbuf)
	} else {
		wire = s.dc.encodeFramed(s.dbuf)
	}
	if err := s.send(frameDisk, wire, false); err != nil {
		return err
	}
	if s.summed(codec(wire[0]) == codecStored) {
		s.sum.Section(container.TypeDisk, section)
	}
	s.ctr.diskWireBytes.Add(uint64(len(wire)))
	s.cur.diskBytes += uint64(n)
	s.cur.diskCost += diskCost(n, piece == nil)
	s.ctr.diskBytes.Add(uint64(n))
	return nil
}

// SendState adds machine state to the open checkpoint. It may be called
// more than once; the pieces are concatenated, at most MaxState bytes in
// all.
func (s *Sender) SendState(state []byte) error {
	if !s.open.Load() {
		return fmt.Errorf("send state: no checkpoint open: %w", ErrProtocol)
	}
	if s.cur.stateLen+uint64(len(state)) > MaxState {
		return fmt.Errorf("send state: %d bytes, at most %d: %w", s.cur.stateLen+uint64(len(state)), MaxState, ErrTooLarge)
	}
	// Pages before state, so that the CRC sees what the receiver sees.
	if err := s.flushAll(); err != nil {
		return err
	}
	for len(state) > 0 {
		n := min(len(state), MaxStateChunk)
		wire := s.statePayload(state[:n], int(s.cur.stateLen))
		if err := s.send(frameState, wire, false); err != nil {
			return err
		}
		if s.summed(codec(wire[0]) == codecStored && wire[1] == stateWhole) {
			s.sum.Section(container.TypeState, state[:n])
		}
		if s.codec != codecStored { // only a compressing sender XORs
			s.nextState = append(s.nextState, state[:n]...)
		}
		s.ctr.stateWireBytes.Add(uint64(len(wire)))
		s.cur.stateLen += uint64(n)
		s.ctr.stateBytes.Add(uint64(n))
		state = state[n:]
	}
	return nil
}

// statePayload is the State frame payload for chunk, the state's bytes
// from off: codec u8 | base u8 | 0 [2] | chunk length u32 | data. With a
// codec, the chunk is XORed with the last checkpoint's state where that
// reaches (stateXOR) and compressed; stored as it is (stateWhole) when
// the session stores pages or that would not be smaller. Valid until the
// next call.
func (s *Sender) statePayload(chunk []byte, off int) []byte {
	if s.sc == nil {
		s.sc = newPageCodec(s.codec)
	}
	src, base := chunk, byte(stateWhole)
	if s.codec != codecStored && off < len(s.lastState) {
		s.xbuf = append(s.xbuf[:0], chunk...)
		subtle.XORBytes(s.xbuf, s.xbuf, s.lastState[off:]) // as far as the shorter reaches
		src, base = s.xbuf, stateXOR
	}
	if b, ok := s.sc.compress(src); ok {
		b[1] = base
		return b
	}
	s.xbuf = append(putPagesHeader(s.xbuf[:0], codecStored, len(chunk)), chunk...)
	return s.xbuf
}

// EndCheckpoint closes the open checkpoint and pushes it onto the wire.
// It does not wait for the ack: see WaitAck and Config.OnAck.
func (s *Sender) EndCheckpoint() error {
	if !s.open.Load() {
		return fmt.Errorf("end checkpoint: no checkpoint open: %w", ErrProtocol)
	}
	if err := s.flushAll(); err != nil {
		return err
	}
	polled := s.pollsForAck()
	// Pending first: the ack may come back before send returns.
	s.amu.Lock()
	s.pending = append(s.pending, pendingAck{epoch: s.cur.epoch, ended: time.Now(), polled: polled})
	s.amu.Unlock()
	s.cur.sum = s.sum.Sum64()
	if err := s.send(frameEnd, appendEnd(nil, s.cur), true); err != nil {
		return err
	}
	if polled {
		s.wakeAckReader()
	}
	s.open.Store(false)
	s.lastEpoch, s.lastKind = s.cur.epoch, s.kind
	if s.cur.stateLen > 0 {
		s.lastState, s.nextState = s.nextState, s.lastState[:0]
	}
	s.ctr.checkpoints.Add(1)
	return nil
}

// Acked is the last epoch the receiver acknowledged (0 if none).
func (s *Sender) Acked() uint64 {
	s.amu.Lock()
	defer s.amu.Unlock()
	return s.acked
}

// WaitAck waits until epoch is acknowledged, the stream fails (its error)
// or ctx ends.
func (s *Sender) WaitAck(ctx context.Context, epoch uint64) error {
	for {
		s.amu.Lock()
		acked, ch := s.acked, s.ackedCh
		s.amu.Unlock()
		if acked >= epoch {
			return nil
		}
		select {
		case <-ch:
		case <-s.done:
			// An ack that raced with the failure still counts.
			if s.Acked() >= epoch {
				return nil
			}
			return s.err
		case <-ctx.Done():
			return fmt.Errorf("wait for ack of epoch %d: %w", epoch, ctx.Err())
		}
	}
}

// ackAwaited says whether the reader should poll: the next ack awaited
// is one pollsForAck chose to poll for.
func (s *Sender) ackAwaited() bool {
	s.amu.Lock()
	defer s.amu.Unlock()
	return len(s.pending) > 0 && s.pending[0].polled
}

// pollsForAck decides, as a checkpoint ends, whether the reader polls for
// its ack (Config.AckSpin).
//
// Why poll: after the End the sender has nothing to do until the ack, so
// its CPU goes idle, and on a virtual machine whose idle CPUs halt the
// ack must then wake it: 0.1-0.4 ms on this project's host, 0.5-0.8 ms
// in the slow cases that a trace of 1,000-page checkpoints after idle
// epochs caught, where the standby needs ~0.3 ms from the End to its ack
// (docs/STREAM.md, "Waiting for the ack awake").
//
// But a spin the ack outlasts is CPU spent for nothing, and acks that
// come later than the spin (a keyed standby opening the last frames, a
// large checkpoint, a slow link) mostly would. So it polls while at
// least a quarter of the recent polled acks came within the spin (ack
// keeps the average), and otherwise for one End in ackProbeEvery, to see
// whether acks come sooner now. Owned by the checkpoint goroutine.
func (s *Sender) pollsForAck() bool {
	if s.cr.ackDue == nil {
		return false
	}
	if s.ackHits.Load() >= ackMinHits {
		s.ackEnds = 0
		return true
	}
	s.ackEnds++
	if s.ackEnds < ackProbeEvery {
		return false
	}
	s.ackEnds = 0
	return true
}

// wakeAckReader wakes the ack reader, asleep in the network poller since
// the last ack, right after an End it polls for went out, so that it
// polls for the ack for up to Config.AckSpin and the ack finds the
// sender's CPU awake. A read deadline in the past is the wake-up call:
// the reader clears it and reads on (countingReader).
func (s *Sender) wakeAckReader() {
	_ = s.conn.SetReadDeadline(time.Unix(1, 0))
}

// readLoop reads the receiver's frames: acks, heartbeats, errors, goodbye.
func (s *Sender) readLoop() {
	defer s.wg.Done()
	for {
		s.listen()
		f, err := s.fr.next()
		s.quiet()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("receiver closed the connection without a goodbye: %w", ErrTruncated)
			}
			s.fail(err, s.fr.start)
			return
		}
		switch f.typ {
		case frameHeartbeat:
		case frameAck:
			if err := s.ack(f.epoch); err != nil {
				s.fail(err, s.fr.start)
				return
			}
		case frameError:
			s.fail(peerError(f.code, string(f.data)), s.fr.start)
			return
		case frameGoodbye:
			s.fail(fmt.Errorf("%w: receiver said goodbye", ErrTruncated), s.fr.start)
			return
		default:
			s.fail(fmt.Errorf("unexpected %v frame from the receiver: %w", f.typ, ErrProtocol), s.fr.start)
			return
		}
	}
}

func (s *Sender) ack(epoch uint64) error {
	s.amu.Lock()
	if len(s.pending) == 0 || s.pending[0].epoch != epoch {
		want := "none"
		if len(s.pending) > 0 {
			want = fmt.Sprint(s.pending[0].epoch)
		}
		s.amu.Unlock()
		return fmt.Errorf("ack for epoch %d, expected %s: %w", epoch, want, ErrProtocol)
	}
	if p := s.pending[0]; p.polled { // pollsForAck's average
		hit := int32(0)
		if time.Since(p.ended) <= s.cfg.AckSpin {
			hit = 1024
		}
		h := s.ackHits.Load()
		s.ackHits.Store(h + (hit-h)/ackHitsWeight)
	}
	s.pending = s.pending[1:]
	s.acked = epoch
	s.ctr.acks.Add(1) // before WaitAck can return: Stats agrees with Acked
	close(s.ackedCh)
	s.ackedCh = make(chan struct{})
	s.amu.Unlock()
	return nil
}

// Close ends the stream deliberately: a goodbye (which also aborts a
// checkpoint still open: the receiver commits nothing of it, and knows
// that the sender is alive and ended replication, so it does not take
// over), then the connection is closed and the Sender's goroutines are
// waited for. Idempotent. After a final checkpoint, Close is the
// migration's abort: only Handover lets the destination run the guest.
func (s *Sender) Close() error {
	s.closeWith(true, "sender closed")
	return nil
}

// Handover ends a migration: once the final checkpoint is acknowledged,
// it tells the destination to run the guest, and closes the stream. From
// the moment Handover is called, whatever it returns, the source must
// never run the guest again: the frame may have arrived even if an error
// says otherwise.
func (s *Sender) Handover() error {
	if s.lastKind != KindFinal || s.open.Load() {
		return fmt.Errorf("handover: no final checkpoint sent: %w", ErrProtocol)
	}
	if s.Acked() < s.lastEpoch {
		return fmt.Errorf("handover: final checkpoint %d not acknowledged: %w", s.lastEpoch, ErrProtocol)
	}
	err := s.send(frameHandover, nil, true)
	s.closeWith(false, "handed over")
	return err
}
