package stream

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
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
	StateBytes       uint64
	// Checkpoints counts checkpoints ended (sender) or committed
	// (receiver); Acks, acks received (sender) or sent (receiver).
	Checkpoints, Acks uint64
}

type counters struct {
	bytesSent, bytesReceived   atomic.Uint64
	framesSent, framesReceived atomic.Uint64
	pages, zeroPages           atomic.Uint64
	stateBytes                 atomic.Uint64
	checkpoints, acks          atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		BytesSent: c.bytesSent.Load(), BytesReceived: c.bytesReceived.Load(),
		FramesSent: c.framesSent.Load(), FramesReceived: c.framesReceived.Load(),
		Pages: c.pages.Load(), ZeroPages: c.zeroPages.Load(), StateBytes: c.stateBytes.Load(),
		Checkpoints: c.checkpoints.Load(), Acks: c.acks.Load(),
	}
}

// endpoint is what Sender and Receiver share: the connection, the framed
// writer under its lock, the heartbeat and failure-detector loop, and the
// one-shot failure.
//
// Lock order: wmu, then nothing (fail never runs under wmu).
type endpoint struct {
	cfg  Config
	log  *slog.Logger
	conn net.Conn

	wmu sync.Mutex // guards fw
	fw  *frameWriter
	fr  *frameReader // only the reading goroutine
	ctr counters

	asyncReader bool // another goroutine reads the peer's frames (sender)

	peer      Identity
	lastHeard atomic.Int64  // unix nanoseconds of the last frame received
	epoch     atomic.Uint64 // epoch in progress, for error reports

	failOnce sync.Once
	err      error         // the first failure; written before done closes
	done     chan struct{} // closed on failure or close
	wg       sync.WaitGroup
}

func newEndpoint(conn net.Conn, cfg Config) *endpoint {
	e := &endpoint{cfg: cfg, conn: conn, done: make(chan struct{})}
	e.log = cfg.Logger.With("component", "replicate/stream", "peer", conn.RemoteAddr().String())
	e.fw = newFrameWriter(conn, &e.ctr.bytesSent, &e.ctr.framesSent)
	e.fr = newFrameReader(conn, &e.ctr.bytesReceived, &e.ctr.framesReceived)
	e.heard()
	return e
}

func (e *endpoint) heard() { e.lastHeard.Store(e.cfg.Clock.Now().UnixNano()) }

// LastHeard is when the last frame from the peer arrived (or the stream
// started).
func (e *endpoint) LastHeard() time.Time { return time.Unix(0, e.lastHeard.Load()) }

// Peer is the identity the peer announced in its hello (authenticated).
func (e *endpoint) Peer() Identity { return e.peer }

// Stats returns the counters.
func (e *endpoint) Stats() Stats { return e.ctr.snapshot() }

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
		if connLost(err) {
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
			// Best effort, bounded: the peer may be what is stuck.
			_ = e.conn.SetWriteDeadline(time.Now().Add(time.Second))
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
		e.log.Warn("stream failed", "err", se)
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

// tickLoop sends heartbeats and trips the failure detector.
func (e *endpoint) startTicker() {
	// The ticker exists before this returns, so a test's clock moves it.
	t := e.cfg.Clock.NewTicker(e.cfg.HeartbeatInterval)
	e.wg.Add(1)
	go e.tickLoop(t)
}

func (e *endpoint) tickLoop(t Ticker) {
	defer e.wg.Done()
	defer t.Stop()
	var hb [8]byte
	for {
		select {
		case <-e.done:
			return
		case <-t.C():
		}
		now := e.cfg.Clock.Now()
		if silent := now.Sub(e.LastHeard()); silent > e.cfg.FailoverTimeout {
			e.fail(fmt.Errorf("nothing heard for %v (timeout %v): %w",
				silent.Round(time.Millisecond), e.cfg.FailoverTimeout, ErrTimeout), -1)
			return
		}
		putUint64(hb[:], uint64(now.UnixNano()))
		if e.send(frameHeartbeat, hb[:], true) != nil {
			return
		}
	}
}

func putUint64(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}
