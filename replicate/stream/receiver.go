package stream

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"

	"govmm/vmm/container"
)

// Receiver is the standby's (or migration destination's) end of a stream.
// Run reads checkpoints into the sinks and commits each one only once its
// EndCheckpoint verifies; the sinks and OnCommit run on Run's goroutine,
// while a reader goroutine of Run's reads, opens, decodes and sums the frames
// ahead of it (recvPipe). A heartbeat goroutine and a failure detector
// run from the handshake's end; Close waits for them.
type Receiver struct {
	*endpoint
	sink  PageSink
	disks DiskSink

	committed  atomic.Uint64 // last committed epoch
	resumable  atomic.Uint64 // last committed resumable epoch
	handedOver atomic.Bool

	// Owned by Run.
	open      bool
	cur       endInfo // running totals of the open checkpoint (its sum: the reader's, frameReader.sumFrame)
	kind      Kind
	zeros     uint64
	state     []byte // the open checkpoint's state; its buffer serves the next one too (end)
	lastEpoch uint64
	lastKind  Kind
	maxPages  uint64
	// A keeper sink holds the buffers of the open checkpoint's Pages
	// frames (kept) until it commits or aborts; then they are spare, for
	// the reader's slots to take in their place.
	keptFrame   bool // the frame just staged left pages in the sink's keeping
	kept, spare [][]byte
	// applying: an asyncCommitter sink applies the last committed
	// checkpoint after its ack, while the next one is staged; that
	// checkpoint's buffers (applyKept) stay the sink's until settle.
	applying  bool
	applyKept [][]byte
	lastPages uint64 // pages of the last committed checkpoint
}

// handshakeReceiver runs the handshake up to the receiver's Auth: the
// sender is authenticated but not yet accepted.
func handshakeReceiver(ctx context.Context, conn net.Conn, cfg Config) (*Receiver, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		conn.Close()
		return nil, err
	}
	if !cfg.Identity.IsZero() {
		if err := cfg.Identity.Validate(); err != nil {
			conn.Close()
			return nil, fmt.Errorf("%w: receiver identity: %w", ErrConfig, err)
		}
	}
	if cfg.Sink == nil {
		cfg.Sink = NewMemSink()
	}
	r := &Receiver{endpoint: newEndpoint(conn, cfg), sink: cfg.Sink, disks: cfg.Disks}
	if err := r.handshake(ctx, roleReceiver); err != nil {
		return nil, err
	}
	r.maxPages = r.peer.Pages()
	r.cr.enable(conn, r.cfg.ReadSpin)
	return r, nil
}

// verdict runs verify on the authenticated sender and tells it: Accept,
// and the heartbeats start; or an Error frame, and the stream closes.
func (r *Receiver) verdict(verify func(Identity) error) error {
	if verify != nil {
		if err := verify(r.peer); err != nil {
			if _, ok := codeOf(err); !ok {
				err = fmt.Errorf("%w: %w", ErrRefused, err)
			}
			return r.fail(fmt.Errorf("sender %q refused: %w", r.peer.Name, err), -1)
		}
	}
	if err := r.send(frameAccept, nil, true); err != nil {
		return err
	}
	r.heard()
	r.log.Info("stream connected", "role", "receiver", "vm", r.peer.Name, "failover_timeout", r.timeout)
	r.startLiveness()
	return nil
}

// SetSinks replaces Config.Sink and Config.Disks; call it before Run (a
// standby builds the memory and disks a sender's checkpoints land in only
// once it knows the sender).
func (r *Receiver) SetSinks(pages PageSink, disks DiskSink) { r.sink, r.disks = pages, disks }

// SetOnCommit replaces Config.OnCommit; call it before Run (a migration
// destination learns what to check only after the handshake).
func (r *Receiver) SetOnCommit(fn func(c *Checkpoint) error) { r.cfg.OnCommit = fn }

// HandedOver reports whether the final checkpoint was committed and the
// sender then said goodbye: only then may a migration destination resume
// the guest, as the source has promised never to.
func (r *Receiver) HandedOver() bool { return r.handedOver.Load() }

// Close ends the stream (with a goodbye unless a checkpoint is open) and
// waits for the receiver's goroutines; a running Run returns ErrClosed.
// Idempotent.
func (r *Receiver) Close() error {
	r.closeWith(true, "receiver closed")
	return nil
}

// Run receives checkpoints until the sender ends the stream, with a
// goodbye (nil) or a handover (nil, and HandedOver), or the stream fails
// (a *StreamError). Whatever ends it, the checkpoint in progress, if any,
// is aborted: nothing of it is committed.
func (r *Receiver) Run(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		r.fail(fmt.Errorf("%w: %w", ErrClosed, context.Cause(ctx)), -1)
	})
	defer stop()
	p := r.startReader()
	at, err := r.loop(p)
	r.quiet()
	if r.open {
		r.abort()
	}
	// Nothing may read the sink's memory (a takeover resumes from it)
	// before the last checkpoint's apply is whole; if it failed, that
	// outranks how the stream ended: the memory is unusable.
	if serr := r.settle(); serr != nil {
		err = serr
	}
	if err == nil {
		r.closeWith(false, "sender said goodbye") // closes the connection: the reader returns
		p.wg.Wait()
		return nil
	}
	err = r.fail(err, at)
	p.wg.Wait()
	r.wg.Wait()
	return err
}

func (r *Receiver) abort() {
	r.sink.Abort()
	r.release()
	if r.disks != nil {
		r.disks.Abort()
	}
	r.open = false
}

// retain leaves the buffer that holds slot's page section (the read
// buffer, or the decompressed section's) to the sink until the checkpoint
// commits or aborts, and gives the slot a spare one in its place.
func (r *Receiver) retain(slot *rxSlot) {
	r.keptFrame = false
	fresh := func() []byte {
		if n := len(r.spare); n > 0 {
			b := r.spare[n-1]
			r.spare = r.spare[:n-1]
			return b
		}
		return make([]byte, 0, MaxFramePayload+macSize)
	}
	if codec(slot.f.payload[0]) != codecStored {
		r.kept = append(r.kept, slot.f.secBuf)
		slot.f.secBuf = fresh()
		return
	}
	r.kept = append(r.kept, slot.buf)
	slot.buf = fresh()
}

// overlapPages is the size of a checkpoint (in pages) from which the
// next one is staged while it is applied; a smaller one is settled when
// the next begins. Measured back to back (BenchmarkAck's checkpoints,
// unkeyed, this project's 2-core host): staging the next checkpoint
// during the apply cut the time to ack at 65,536 pages (from 1.6-2.1×
// the loopback bound to 1.4×) and a little at 16,384 pages (4%); at
// 4,096 pages it was the same or slower (1.48-1.62× against
// 1.34-1.48× in four paired runs): the socket buffers hold what the
// sender writes while the apply of a checkpoint that small runs, and a
// second set of frame buffers is one more the cache must hold (our
// guess). Below it the standby keeps one checkpoint's staging, as
// before. A variable for the tests.
var overlapPages uint64 = 16384

// settle waits until an asyncCommitter sink has applied the last
// committed checkpoint, and makes its kept buffers spare.
func (r *Receiver) settle() error {
	if !r.applying {
		return nil
	}
	r.applying = false
	err := r.sink.(asyncCommitter).settle()
	r.spare = append(r.spare, r.applyKept...)
	clear(r.applyKept)
	r.applyKept = r.applyKept[:0]
	if err != nil {
		return fmt.Errorf("checkpoint %d: apply to memory (standby memory now unusable): %w: %w", r.committed.Load(), ErrCommit, err)
	}
	return nil
}

// release makes the buffers the sink kept spare, once it has committed or
// aborted the checkpoint.
func (r *Receiver) release() {
	r.spare = append(r.spare, r.kept...)
	clear(r.kept)
	r.kept = r.kept[:0]
}

// loop handles the frames the reader hands it until the stream ends; at is
// the stream offset of the frame that ended it.
func (r *Receiver) loop(p *recvPipe) (at int64, err error) {
	for {
		it := <-p.got // the reader listens
		at = it.start
		if err := r.frame(it.f, it.err); err != nil || it.err != nil || it.f.typ == frameGoodbye || it.f.typ == frameHandover {
			return at, err
		}
		if r.keptFrame {
			r.retain(&p.slots[it.slot])
		}
		p.free <- it.slot
	}
}

// frame handles one frame the reader read, or its failure to read one;
// nil from a goodbye or handover ends the stream.
func (r *Receiver) frame(f *frame, err error) error {
	if err != nil {
		if errors.Is(err, io.EOF) {
			if r.open {
				return fmt.Errorf("connection closed inside checkpoint %d: %w", r.cur.epoch, ErrTruncated)
			}
			return fmt.Errorf("connection closed without a goodbye: %w", ErrTruncated)
		}
		return err
	}
	switch f.typ {
	case frameHeartbeat:
	case frameBegin:
		err = r.begin(f.epoch, f.kind)
	case framePages:
		err = r.pages(f.pages)
	case frameDisk:
		err = r.disk(&f.disk)
	case frameState:
		err = r.stateChunk(f.data)
	case frameEnd:
		err = r.end(f.end, f.sum)
	case frameError:
		return peerError(f.code, string(f.data))
	case frameGoodbye:
		// The sender is alive and ends the stream on purpose, inside a
		// checkpoint or not (Run aborts an open one). After a final
		// checkpoint, this is a migration the source aborted.
		return nil
	case frameHandover:
		if r.open || r.lastKind != KindFinal {
			return fmt.Errorf("handover without a committed final checkpoint: %w", ErrProtocol)
		}
		r.handedOver.Store(true)
		return nil
	default:
		err = fmt.Errorf("unexpected %v frame from the sender: %w", f.typ, ErrProtocol)
	}
	return err
}

func (r *Receiver) begin(epoch uint64, kind Kind) error {
	switch {
	case r.open:
		return fmt.Errorf("begin %d inside checkpoint %d: %w", epoch, r.cur.epoch, ErrProtocol)
	case r.lastKind == KindFinal:
		return fmt.Errorf("begin %d after the final checkpoint: %w", epoch, ErrProtocol)
	case epoch <= r.lastEpoch:
		return fmt.Errorf("begin %d: epoch not above %d: %w", epoch, r.lastEpoch, ErrProtocol)
	case kind < r.lastKind:
		return fmt.Errorf("begin %d: %v after %v: %w", epoch, kind, r.lastKind, ErrProtocol)
	}
	r.epoch.Store(epoch)
	// The last checkpoint's apply, if it is still running, goes on while
	// this one is staged (until end: settle), unless the sink makes this
	// one wait for it. One already done is settled now: its buffers are
	// spare again for this checkpoint's frames (staging every checkpoint
	// in a second set of buffers made acks at 1,000 pages after a 50 ms
	// gap 12-21% slower in four paired runs; the cache, we guess).
	if r.applying && (r.sink.(asyncCommitter).applied() || r.lastPages < overlapPages) {
		if err := r.settle(); err != nil {
			return err
		}
	}
	if err := r.sink.Begin(epoch, kind); err != nil {
		return fmt.Errorf("sink: begin %d: %w: %w", epoch, ErrCommit, err)
	}
	if r.disks != nil {
		if err := r.disks.Begin(epoch, kind); err != nil {
			r.sink.Abort()
			return fmt.Errorf("disk sink: begin %d: %w: %w", epoch, ErrCommit, err)
		}
	}
	r.open, r.kind, r.lastEpoch = true, kind, epoch
	r.cur, r.zeros, r.state = endInfo{epoch: epoch}, 0, r.state[:0]
	return nil
}

// pages stages the pages of a Pages frame (the reader summed its
// section).
func (r *Receiver) pages(ps []container.Page) error {
	if !r.open {
		return fmt.Errorf("pages outside a checkpoint: %w", ErrProtocol)
	}
	if r.cur.pages+uint64(len(ps)) > r.maxPages {
		return fmt.Errorf("checkpoint %d: more pages than the guest has (%d): %w", r.cur.epoch, r.maxPages, ErrTooLarge)
	}
	// A keeper keeps the pages in the frame's buffer (retain) rather than
	// copy them; not with deltas, whose pages are the shadow's.
	k, keep := r.sink.(keeper)
	keep = keep && r.shadow == nil
	for _, p := range ps {
		data, err := r.undelta(p)
		if err != nil {
			return err
		}
		if keep {
			var kept bool
			kept, err = k.keepPage(GPA(p.GPA), data)
			r.keptFrame = r.keptFrame || kept
		} else {
			err = r.sink.StagePage(GPA(p.GPA), data)
		}
		if err != nil {
			return fmt.Errorf("sink: stage page %#x: %w: %w", p.GPA, ErrCommit, err)
		}
	}
	r.cur.pages += uint64(len(ps))
	r.ctr.pages.Add(uint64(len(ps)))
	return nil
}

// undelta returns the page p carries (nil for a zero page) and, with
// deltas on, keeps the shadow: a delta is applied onto the version this
// stream shipped last, and the result must match the CRC32C the sender
// took of the page (a base mismatch is ErrChecksum).
func (r *Receiver) undelta(p container.Page) ([]byte, error) {
	if p.Enc == container.EncZero {
		r.zeros++
		r.ctr.zeroPages.Add(1)
	}
	if r.shadow == nil {
		return p.Data, nil // ParsePages refused deltas
	}
	base, i, ok := r.shadow.page(GPA(p.GPA))
	if !ok {
		return nil, fmt.Errorf("page %#x: outside the memory layout: %w", p.GPA, ErrOutOfRange)
	}
	known := r.shadow.isKnown(i)
	r.shadow.setKnown(i)
	switch p.Enc {
	case container.EncZero:
		clear(base)
		return nil, nil
	case container.EncRaw:
		copy(base, p.Data)
		return p.Data, nil
	}
	if err := r.shadow.apply(GPA(p.GPA), base, i, known, p.Enc, p.Data); err != nil { // delta.go
		return nil, err
	}
	if p.Enc == container.EncCopy {
		r.ctr.copyPages.Add(1)
	} else {
		r.ctr.deltaPages.Add(1)
	}
	return base, nil
}

// disk stages the write of a Disk frame (the reader summed its section).
func (r *Receiver) disk(w *container.DiskWrite) error {
	switch {
	case !r.open:
		return fmt.Errorf("disk write outside a checkpoint: %w", ErrProtocol)
	case r.disks == nil:
		return fmt.Errorf("disk write, but this receiver has no disks: %w", ErrProtocol)
	case r.cur.diskCost+diskCost(int(w.Length), w.Zero) > MaxCheckpointDisk:
		return fmt.Errorf("checkpoint %d: disk frames cost over %d: %w", r.cur.epoch, MaxCheckpointDisk, ErrTooLarge)
	}
	var err error
	if w.Zero {
		err = r.disks.StageZero(int(w.Disk), int64(w.Off), int64(w.Length))
	} else {
		err = r.disks.StageWrite(int(w.Disk), int64(w.Off), w.Data)
	}
	if err != nil {
		return fmt.Errorf("disk sink: disk %d write at %d+%d: %w: %w", w.Disk, w.Off, w.Length, ErrCommit, err)
	}
	r.cur.diskBytes += uint64(w.Length)
	r.cur.diskCost += diskCost(int(w.Length), w.Zero)
	r.ctr.diskBytes.Add(uint64(w.Length))
	return nil
}

func (r *Receiver) stateChunk(b []byte) error {
	if !r.open {
		return fmt.Errorf("state outside a checkpoint: %w", ErrProtocol)
	}
	if uint64(len(r.state))+uint64(len(b)) > MaxState {
		return fmt.Errorf("checkpoint %d: state over %d bytes: %w", r.cur.epoch, MaxState, ErrTooLarge)
	}
	r.state = append(r.state, b...)
	r.ctr.stateBytes.Add(uint64(len(b)))
	return nil
}

// end verifies and commits the open checkpoint, and acks it; e is what
// the sender's End frame says, sum what the reader summed of the
// checkpoint's sections.
func (r *Receiver) end(e endInfo, sum uint64) error {
	if !r.open {
		return fmt.Errorf("end outside a checkpoint: %w", ErrProtocol)
	}
	got := endInfo{epoch: r.cur.epoch, pages: r.cur.pages, stateLen: uint64(len(r.state)), diskBytes: r.cur.diskBytes, sum: sum}
	switch {
	case e.epoch != got.epoch:
		return fmt.Errorf("end of epoch %d inside checkpoint %d: %w", e.epoch, got.epoch, ErrProtocol)
	case e.pages != got.pages:
		return fmt.Errorf("checkpoint %d: end says %d pages, received %d: %w", got.epoch, e.pages, got.pages, ErrChecksum)
	case e.stateLen != got.stateLen:
		return fmt.Errorf("checkpoint %d: end says %d state bytes, received %d: %w", got.epoch, e.stateLen, got.stateLen, ErrChecksum)
	case e.diskBytes != got.diskBytes:
		return fmt.Errorf("checkpoint %d: end says %d disk bytes, received %d: %w", got.epoch, e.diskBytes, got.diskBytes, ErrChecksum)
	case e.sum != got.sum:
		return fmt.Errorf("checkpoint %d: end says sum %#016x, received %#016x: %w", got.epoch, e.sum, got.sum, ErrChecksum)
	}
	// The last checkpoint's apply (which ran while this one was staged)
	// first: it must be whole before this one's starts, and a failure
	// of it leaves memory unusable, for this checkpoint too.
	if err := r.settle(); err != nil {
		return err
	}
	c := &Checkpoint{Epoch: got.epoch, Kind: r.kind, Pages: got.pages, ZeroPages: r.zeros, DiskBytes: got.diskBytes}
	if len(r.state) > 0 {
		c.State = r.state
	}
	// r.state's buffer serves the next checkpoint too (Checkpoint.State
	// is the callee's only until OnCommit returns): a fresh one each time
	// is memory the kernel maps page by page at its first write, on the
	// way to the ack (docs/STREAM.md, "The state's buffer").
	if r.cfg.OnCommit != nil {
		if err := r.cfg.OnCommit(c); err != nil {
			return fmt.Errorf("checkpoint %d: %w: %w", got.epoch, ErrCommit, err)
		}
	}
	r.open = false // from here the sinks are committed, not aborted
	if r.disks != nil {
		if err := r.disks.Commit(); err != nil {
			r.sink.Abort()
			r.release()
			return fmt.Errorf("checkpoint %d: disk commit (standby disks now unusable): %w: %w", got.epoch, ErrCommit, err)
		}
	}
	if ac, ok := r.sink.(asyncCommitter); ok {
		if err := ac.commitStart(); err != nil { // applied after the ack: settle
			r.sink.Abort()
			r.release()
			return fmt.Errorf("checkpoint %d: sink commit (standby memory now unusable): %w: %w", got.epoch, ErrCommit, err)
		}
		r.applying = true
		r.kept, r.applyKept = r.applyKept, r.kept // settle left applyKept empty
		r.lastPages = got.pages
	} else {
		err := r.sink.Commit()
		r.release()
		if err != nil {
			return fmt.Errorf("checkpoint %d: sink commit (standby memory now unusable): %w: %w", got.epoch, ErrCommit, err)
		}
	}
	r.committed.Store(got.epoch)
	if r.kind.Resumable() {
		r.resumable.Store(got.epoch)
	}
	r.lastKind = r.kind
	r.ctr.checkpoints.Add(1)
	var a [8]byte
	binary.LittleEndian.PutUint64(a[:], got.epoch)
	if err := r.send(frameAck, a[:], true); err != nil {
		return err
	}
	r.ctr.acks.Add(1)
	return nil
}
