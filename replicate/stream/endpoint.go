package stream

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Stats are an end's counters. Bytes count everything on the wire:
// headers, payloads (ciphertext once keyed) and MACs or tags.
type Stats struct {
	BytesSent, BytesReceived   uint64
	FramesSent, FramesReceived uint64
	// Pages and ZeroPages count pages sent (sender) or received
	// (receiver); ZeroPages of them travelled without bytes.
	Pages, ZeroPages uint64
	// StateBytes counts machine state bytes sent (received);
	// StateWireBytes (sender) the State frames' payloads as they travelled
	// (as an XOR with the last state, compressed, or stored, with their
	// 8-byte header), before sealing.
	StateBytes, StateWireBytes uint64
	// DiskBytes counts disk bytes written or zeroed by Disk frames;
	// DiskWireBytes (sender) the Disk frames' payloads as they travelled
	// (compressed, or stored with their 8-byte header), before sealing.
	DiskBytes, DiskWireBytes uint64
	// Checkpoints counts checkpoints ended (sender) or committed
	// (receiver); Acks, acks received (sender) or sent (receiver).
	Checkpoints, Acks uint64
	// Heartbeats counts heartbeats sent.
	Heartbeats uint64
	// PageBytes counts the page sections' bytes (entries and page data,
	// as a snapshot would store them); PageWireBytes the Pages frames'
	// payloads as they travelled (compressed, or stored with their 8-byte
	// header), before sealing.
	PageBytes, PageWireBytes uint64
	// DeltaPages counts pages that travelled as XOR deltas, CopyPages
	// those that travelled as a reference to a page with the same bytes
	// that the stream shipped before (deltas only).
	DeltaPages, CopyPages uint64
	// Deltas says whether the two ends agreed on deltas.
	Deltas bool
	// Compression is the codec the two ends agreed on for Pages frames
	// ("none", "s2" or "zstd").
	Compression string
	// Cipher is what the session's frames are sealed with (Cipher).
	Cipher string
	// SendBuffer (sender) is the send buffer its socket was fixed at
	// (Config.SendBuffer), 0 where it is the kernel's, autotuned.
	SendBuffer int
	// SealTime is the time spent sealing frames (the session's cipher), WriteTime
	// the time spent handing sealed frames to the connection (buffer
	// copies and write system calls, blocked ones included); OpenTime is
	// the time spent opening received frames.
	SealTime, WriteTime, OpenTime time.Duration
	// PollHits counts reads that found the connection drained and,
	// polling, bytes arriving within the spin: a sleep and a wakeup
	// saved. PollMisses counts those that found none within it and
	// slept. A receiver polls inside a checkpoint (Config.ReadSpin), a
	// sender for an awaited ack (Config.AckSpin).
	PollHits, PollMisses uint64
}

type counters struct {
	bytesSent, bytesReceived   atomic.Uint64
	framesSent, framesReceived atomic.Uint64
	pages, zeroPages           atomic.Uint64
	stateBytes, diskBytes      atomic.Uint64
	stateWireBytes             atomic.Uint64
	checkpoints, acks          atomic.Uint64
	heartbeats                 atomic.Uint64
	pageBytes, pageWireBytes   atomic.Uint64
	diskWireBytes              atomic.Uint64
	deltaPages, copyPages      atomic.Uint64
	sealNanos, writeNanos      atomic.Int64
	openNanos                  atomic.Int64
	pollHits, pollMisses       atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		BytesSent: c.bytesSent.Load(), BytesReceived: c.bytesReceived.Load(),
		FramesSent: c.framesSent.Load(), FramesReceived: c.framesReceived.Load(),
		Pages: c.pages.Load(), ZeroPages: c.zeroPages.Load(), StateBytes: c.stateBytes.Load(), StateWireBytes: c.stateWireBytes.Load(),
		DiskBytes: c.diskBytes.Load(), Checkpoints: c.checkpoints.Load(), Acks: c.acks.Load(),
		Heartbeats: c.heartbeats.Load(),
		PageBytes:  c.pageBytes.Load(), PageWireBytes: c.pageWireBytes.Load(), DiskWireBytes: c.diskWireBytes.Load(), DeltaPages: c.deltaPages.Load(),
		CopyPages: c.copyPages.Load(),
		SealTime:  time.Duration(c.sealNanos.Load()), WriteTime: time.Duration(c.writeNanos.Load()),
		OpenTime: time.Duration(c.openNanos.Load()),
		PollHits: c.pollHits.Load(), PollMisses: c.pollMisses.Load(),
	}
}

// endpoint is what Sender and Receiver share: the connection, the framed
// writer under its lock, the heartbeat and failure-detector goroutines,
// and the one-shot failure.
//
// # Liveness
//
// Any byte that arrives from the peer is life (countingReader), not only
// whole frames: a large checkpoint in transit keeps its sender alive. Each
// end sends heartbeats from a goroutine of its own, so they leave while
// the end is busy with checkpoint work; one that finds the writer busy
// skips its beat, since that writer's bytes are life to the peer. Silence
// is counted only while this end's reader waits for the peer (listening):
// time spent applying a checkpoint, syncing a disk, or stalled by its own
// host is not the peer's silence. The detector also needs the timeout's
// worth of its own ticks, so an end that was itself frozen does not blame
// the peer when it thaws. Writes carry deadlines (deadlineWriter), so no
// goroutine waits forever behind a write that cannot progress.
//
// Lock order: wmu, then nothing (fail never runs under wmu).
type endpoint struct {
	cfg  Config
	log  *slog.Logger
	conn net.Conn
	dw   *deadlineWriter

	wmu sync.Mutex // guards fw
	fw  *frameWriter
	fr  *frameReader // only the reading goroutine
	ctr counters

	asyncReader bool // another goroutine reads the peer's frames (sender)

	peer      Identity
	codec     codec           // the session's page codec, agreed in the handshake
	cr        *countingReader // the connection as fr reads it
	sealed    bool            // session frames are sealed (a key): see summed
	cipher    sessionCipher   // what a keyed session seals with (chooseCipher)
	shadow    *shadow         // deltas agreed: the memory as shipped (the checkpoint goroutine, or Run)
	timeout   time.Duration   // agreed failover timeout (the larger of the two)
	lastHeard atomic.Int64    // unix ns of the last byte received, or of when listening resumed
	judged    atomic.Uint64   // detector ticks judged (tests wait on it)
	listening atomic.Bool     // the reader waits for the peer's bytes
	epoch     atomic.Uint64   // epoch in progress, for error reports

	// A sender's, set by NewSender before the stream's goroutines
	// start, then only read (tuneSendBuffer).
	sendBuffer int           // the send buffer fixed (0: the kernel's)
	rtt        time.Duration // the handshake's shortest round trip (0: unknown)

	failOnce sync.Once
	err      error         // the first failure; written before done closes
	done     chan struct{} // closed on failure or close
	wg       sync.WaitGroup
}

func newEndpoint(conn net.Conn, cfg Config) *endpoint {
	e := &endpoint{cfg: cfg, conn: conn, done: make(chan struct{}), timeout: cfg.FailoverTimeout}
	e.log = cfg.Logger.With("component", "replicate/stream", "peer", conn.RemoteAddr().String())
	e.dw = &deadlineWriter{conn: conn, stall: cfg.StallTimeout}
	e.fw = newFrameWriter(e.dw, &e.ctr)
	e.cr = &countingReader{r: conn, e: e}
	e.fr = newFrameReader(e.cr, &e.ctr)
	e.heard()
	return e
}

func (e *endpoint) heard() { e.lastHeard.Store(e.cfg.Clock.Now().UnixNano()) }

// listen marks the reader as waiting for the peer: silence counts from
// now. quiet marks it busy with what it read.
func (e *endpoint) listen() {
	if !e.listening.Load() {
		e.heard()
		e.listening.Store(true)
	}
}

func (e *endpoint) quiet() { e.listening.Store(false) }

// Peer is the identity the peer announced in its hello (authenticated).
func (e *endpoint) Peer() Identity { return e.peer }

// Cipher names what the session's frames are sealed with:
// "aegis-128x2", "aegis-128l" or "aes-256-gcm" in a keyed session, "none" (a CRC32C trailer) in an
// unkeyed one.
func (e *endpoint) Cipher() string {
	if !e.sealed {
		return "none"
	}
	return e.cipher.String()
}

// RemoteAddr is the peer's network address (host:port).
func (e *endpoint) RemoteAddr() string { return e.conn.RemoteAddr().String() }

// FailoverTimeout is the timeout both ends agreed on in the handshake.
func (e *endpoint) FailoverTimeout() time.Duration { return e.timeout }

// Stats returns the counters.
func (e *endpoint) Stats() Stats {
	s := e.ctr.snapshot()
	s.Compression = e.codec.String()
	s.Cipher = e.Cipher()
	s.SendBuffer = e.sendBuffer
	s.Deltas = e.shadow != nil
	return s
}

// Done is closed when the stream has failed or been closed; Err says why.
func (e *endpoint) Done() <-chan struct{} { return e.done }

// Err is the stream's failure, or nil while it is healthy.
func (e *endpoint) Err() error {
	select {
	case <-e.done:
		return e.err
	default:
		return nil
	}
}

// send writes one frame, and flushes if asked. Errors fail the stream.
func (e *endpoint) send(t frameType, payload []byte, flush bool) error {
	e.wmu.Lock()
	err := e.fw.write(t, payload)
	if err == nil && flush {
		err = e.fw.flush()
	}
	e.wmu.Unlock()
	return e.sent(t, err)
}

// sendPieces is send for an unkeyed session's Pages frame whose payload
// (n bytes) lies in pieces (frameWriter.writePieces), unflushed.
func (e *endpoint) sendPieces(pieces [][]byte, n int) error {
	e.wmu.Lock()
	err := e.fw.writePieces(framePages, pieces, n)
	e.wmu.Unlock()
	return e.sent(framePages, err)
}

// sendParts is send for a keyed session's Pages frame sealed in parts,
// head and the data's runs, n bytes in all
// (frameWriter.writeSealedParts), unflushed.
func (e *endpoint) sendParts(head []byte, parts [][]byte, n int) error {
	e.wmu.Lock()
	err := e.fw.writeSealedParts(framePages, head, parts, n)
	e.wmu.Unlock()
	return e.sent(framePages, err)
}

// sent fails the stream if sending a frame of type t failed with err.
func (e *endpoint) sent(t frameType, err error) error {
	if err != nil {
		if e.asyncReader {
			// The peer usually closed because it refused something and
			// said why in an Error frame that our reader is about to
			// surface: that verdict beats "broken pipe".
			select {
			case <-e.done:
			case <-time.After(250 * time.Millisecond):
			}
		}
		if connectionLost(err) {
			// The peer vanished while we wrote (an ack to a primary
			// that was just killed): the same verdict as reading EOF.
			return e.fail(fmt.Errorf("send %v: connection lost (%v): %w", t, err, ErrTruncated), -1)
		}
		return e.fail(fmt.Errorf("send %v: %w", t, err), -1)
	}
	return nil
}

// fail records the stream's first failure and tears it down: it tells the
// peer why when the cause is a verdict on the peer's bytes, closes the
// connection (which unblocks every goroutine) and calls OnFailure. It
// returns the first failure, which may be an earlier one.
func (e *endpoint) fail(err error, offset int64) error {
	return e.failWith(err, offset, false)
}

// failWith is fail, with a goodbye instead of an error frame when asked
// (a local close): both happen under failOnce, so a peer reacting to the
// goodbye cannot make its own verdict ours.
func (e *endpoint) failWith(err error, offset int64, goodbye bool) error {
	e.failOnce.Do(func() {
		var se *StreamError
		if !errors.As(err, &se) {
			se = &StreamError{Epoch: e.epoch.Load(), Offset: offset, Err: err}
		}
		e.err = se
		code, ok := codeOf(err)
		if ok || goodbye {
			// Best effort, bounded: the peer may be what is stuck. The short
			// deadline also applies to a write blocked right now, which
			// then gives up the lock.
			e.dw.shorten(time.Second)
			e.wmu.Lock()
			t, p := frameGoodbye, []byte(nil)
			if !goodbye {
				t, p = frameError, appendError(nil, code, err.Error())
			}
			if e.fw.write(t, p) == nil {
				_ = e.fw.flush()
			}
			e.wmu.Unlock()
		}
		_ = e.conn.Close()
		close(e.done)
		if errors.Is(err, ErrClosed) {
			return
		}
		// The error goes to whoever uses the endpoint (Err, OnFailure),
		// which reports it once, in its own words (a refused connection, a
		// lost standby, a takeover): logging it here as well would say it
		// twice.
		e.log.Debug("stream failed", "err", se)
		if e.cfg.OnFailure != nil {
			go e.cfg.OnFailure(se)
		}
	})
	return e.err
}

// closeWith ends the stream locally: a goodbye when asked and possible,
// then ErrClosed.
func (e *endpoint) closeWith(goodbye bool, why string) {
	e.failWith(fmt.Errorf("%w: %s", ErrClosed, why), -1, goodbye)
	e.wg.Wait()
}

// startLiveness starts the heartbeat and failure-detector goroutines. The
// tickers exist before it returns, so a test's clock moves them.
func (e *endpoint) startLiveness() {
	hb := e.cfg.Clock.NewTicker(e.cfg.HeartbeatInterval)
	det := e.cfg.Clock.NewTicker(e.detectEvery())
	e.wg.Add(2)
	go e.heartbeatLoop(hb)
	go e.detectLoop(det)
}

// detectEvery is the detector's tick: an eighth of the agreed timeout.
func (e *endpoint) detectEvery() time.Duration { return max(e.timeout/8, time.Millisecond) }

// heartbeatLoop sends a heartbeat every interval unless the writer is
// busy (its bytes already tell the peer we live). It may block in a write;
// the detector does not wait for it.
func (e *endpoint) heartbeatLoop(t Ticker) {
	defer e.wg.Done()
	defer t.Stop()
	var hb [8]byte
	for {
		select {
		case <-e.done:
			return
		case <-t.C():
		}
		if !e.wmu.TryLock() {
			continue
		}
		putUint64(hb[:], uint64(e.cfg.Clock.Now().UnixNano()))
		err := e.fw.write(frameHeartbeat, hb[:])
		if err == nil {
			err = e.fw.flush()
		}
		e.wmu.Unlock()
		if err != nil {
			if connectionLost(err) {
				// The reader meets the same loss and reports it as what it
				// is (ErrTruncated: the peer is gone); a write error must
				// not be the verdict that hides it.
				return
			}
			e.fail(fmt.Errorf("send heartbeat: %w", err), -1)
			return
		}
		e.ctr.heartbeats.Add(1)
	}
}

// detectLoop declares the peer lost when, while this end listened,
// nothing arrived for the agreed timeout and for as many of its own
// ticks. It never writes, so nothing it waits for can block it.
func (e *endpoint) detectLoop(t Ticker) {
	defer e.wg.Done()
	defer t.Stop()
	need := int((e.timeout + e.detectEvery() - 1) / e.detectEvery())
	quietTicks, seen := 0, e.lastHeard.Load()
	for {
		select {
		case <-e.done:
			return
		case <-t.C():
		}
		h := e.lastHeard.Load()
		if !e.listening.Load() || h != seen {
			// Busy with our own work, or the peer spoke.
			quietTicks, seen = 0, h
			e.judged.Add(1)
			continue
		}
		quietTicks++
		silent := e.cfg.Clock.Now().Sub(time.Unix(0, h))
		e.judged.Add(1)
		if quietTicks >= need && silent >= e.timeout {
			e.fail(fmt.Errorf("nothing heard for %v while listening (timeout %v): %w",
				silent.Round(time.Millisecond), e.timeout, ErrTimeout), -1)
			return
		}
	}
}

func putUint64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

// countingReader is the connection as the frame reader sees it: every
// byte that arrives is a sign of life. A receiver's also polls inside a
// checkpoint (poll.go).
type countingReader struct {
	r interface{ Read([]byte) (int, error) }
	e *endpoint
	poller
	// ackDue (sender, with Config.AckSpin set) says whether the next ack
	// awaited is one to poll for (Sender.ackAwaited); a sender's reader
	// also takes an expired read deadline for the Sender's wake-up call
	// (Sender.wakeAckReader), not a failure. nil on a receiver, or where
	// the sender never polls.
	ackDue func() bool
}

func (c *countingReader) Read(p []byte) (int, error) {
	for {
		if c.ackDue != nil {
			c.polling = c.raw != nil && c.ackDue()
		}
		n := c.pollRead(p, &c.e.ctr)
		var err error
		if n == 0 {
			n, err = c.r.Read(p)
		}
		if n > 0 {
			c.e.heard()
		}
		if n == 0 && c.ackDue != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			// Woken to poll for an ack: nothing else sets a read deadline
			// once the handshake is over.
			_ = c.e.conn.SetReadDeadline(time.Time{})
			continue
		}
		return n, err
	}
}

// deadlineWriter writes to the connection in pieces, each with a deadline:
// a write that makes no progress for the stall timeout fails (ErrStalled)
// instead of blocking forever (a partition, a stuck peer).
type deadlineWriter struct {
	conn  net.Conn
	mu    sync.Mutex // guards stall and limit; orders deadline updates
	stall time.Duration
	limit time.Time // if set, no deadline later than this (the handshake's)
}

// deadline is the write deadline for a piece starting now (w.mu held).
func (w *deadlineWriter) deadline() time.Time {
	d := time.Now().Add(w.stall)
	if !w.limit.IsZero() && w.limit.Before(d) {
		d = w.limit
	}
	return d
}

// until caps every write deadline at t (zero: no cap).
func (w *deadlineWriter) until(t time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.limit = t
	_ = w.conn.SetWriteDeadline(w.deadline())
}

// setStall sets the stall timeout.
func (w *deadlineWriter) setStall(d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stall = d
}

const writePiece = 1 << 20 // more than bufio hands over at once: one deadline per write system call

func (w *deadlineWriter) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		k := min(len(p)-n, writePiece)
		w.mu.Lock()
		stall := w.stall
		_ = w.conn.SetWriteDeadline(w.deadline())
		w.mu.Unlock()
		m, err := w.conn.Write(p[n : n+k])
		n += m
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return n, fmt.Errorf("no progress writing for %v: %w", stall, ErrStalled)
			}
			return n, err
		}
	}
	return n, nil
}

// writeBuffers writes bufs back to back in as few system calls as the
// connection allows (writev on TCP), under one deadline: a frame, whose
// payload is at most about writePiece.
func (w *deadlineWriter) writeBuffers(bufs [][]byte) (int64, error) {
	w.mu.Lock()
	stall := w.stall
	_ = w.conn.SetWriteDeadline(w.deadline())
	w.mu.Unlock()
	nb := net.Buffers(bufs)
	n, err := nb.WriteTo(w.conn)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return n, fmt.Errorf("no progress writing for %v: %w", stall, ErrStalled)
	}
	return n, err
}

// shorten bounds every write from now on, the one in progress included,
// to d.
func (w *deadlineWriter) shorten(d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if d < w.stall {
		w.stall = d
	}
	_ = w.conn.SetWriteDeadline(w.deadline())
}
