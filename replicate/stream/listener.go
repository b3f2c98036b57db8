package stream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// Listener accepts streams. Every connection gets its own handshake
// goroutine, so a stranger that connects and says nothing, or a garbled
// hello, holds up nobody: it is refused (Config.OnRefused) when its
// handshake fails or times out, and the Listener keeps listening. An
// authenticated sender is verified (Config.Verify) and accepted only by
// an Accept call; it waits for one (within the handshake timeout) unless
// the last Receiver accepted is still running, in which case it is
// refused with ErrBusy. Verify calls never overlap.
type Listener struct {
	ln     net.Listener
	ctx    context.Context // the Listener's life: cancelled by Close
	cancel context.CancelFunc
	start  sync.Once
	wg     sync.WaitGroup

	mu      sync.Mutex     // guards the fields below; held across Verify
	cfg     Config         // fixed at Listen
	waiting chan *Receiver // set while an Accept waits for a sender
	wake    chan struct{}  // closed (and replaced) when an Accept starts waiting
	serving *Receiver      // the last Receiver accepted
}

// Listen listens on addr (TCP). Without a key only a loopback address is
// allowed (CheckListenAddr).
func Listen(addr string, cfg Config) (*Listener, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if err := CheckListenAddr(addr, len(cfg.Key) > 0); err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for stream: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Listener{ln: ln, cfg: cfg, ctx: ctx, cancel: cancel, wake: make(chan struct{})}, nil
}

// Addr is the address listened on.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// Close stops listening and refuses the handshakes in progress; accepted
// Receivers are not affected.
func (l *Listener) Close() error {
	l.cancel()
	err := l.ln.Close()
	l.wg.Wait()
	return err
}

// Accept waits for a sender that passes the handshake and Config.Verify,
// and returns its accepted Receiver. Refused connections do not end the
// wait (see Listener). It returns an error only when ctx ends or the
// Listener is closed.
func (l *Listener) Accept(ctx context.Context) (*Receiver, error) {
	l.start.Do(func() {
		l.wg.Add(1)
		go l.acceptLoop()
	})
	ch := make(chan *Receiver, 1)
	l.mu.Lock()
	if l.waiting != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("accept stream: another Accept is waiting: %w", ErrProtocol)
	}
	l.waiting = ch
	close(l.wake)
	l.wake = make(chan struct{})
	l.mu.Unlock()
	var err error
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		err = fmt.Errorf("accept stream: %w", ctx.Err())
	case <-l.ctx.Done():
		err = fmt.Errorf("accept stream: %w: listener closed", ErrClosed)
	}
	l.mu.Lock()
	if l.waiting == ch {
		l.waiting = nil
	}
	l.mu.Unlock()
	select {
	case r := <-ch: // accepted just as we gave up
		r.Close()
	default:
	}
	return nil, err
}

func (l *Listener) acceptLoop() {
	defer l.wg.Done()
	for {
		conn, err := l.ln.Accept()
		if err != nil {
			if l.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			l.refused(fmt.Errorf("accept stream: %w", err))
			time.Sleep(10 * time.Millisecond) // e.g. out of file descriptors: do not spin
			continue
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true)
		}
		l.wg.Add(1)
		go l.serve(conn)
	}
}

// serve runs one connection's handshake and, if an Accept waits, the
// verdict.
func (l *Listener) serve(conn net.Conn) {
	defer l.wg.Done()
	l.mu.Lock()
	cfg := l.cfg
	l.mu.Unlock()
	deadline := time.NewTimer(cfg.HandshakeTimeout)
	defer deadline.Stop()
	r, err := handshakeReceiver(l.ctx, conn, cfg)
	if err != nil {
		l.refused(fmt.Errorf("connection from %s: %w", conn.RemoteAddr(), err))
		return
	}
	if err := l.deliver(r, deadline.C); err != nil {
		l.refused(fmt.Errorf("connection from %s: %w", conn.RemoteAddr(), err))
	}
}

// deliver hands an authenticated sender to an Accept, waiting for one
// until timeout unless another sender is being served.
func (l *Listener) deliver(r *Receiver, timeout <-chan time.Time) error {
	for {
		l.mu.Lock()
		switch {
		case l.ctx.Err() != nil:
			l.mu.Unlock()
			return r.fail(fmt.Errorf("%w: listener closed", ErrClosed), -1)
		case l.serving != nil && l.serving.Err() == nil:
			l.mu.Unlock()
			return r.fail(fmt.Errorf("already serving a sender: %w", ErrBusy), -1)
		case l.waiting != nil:
			err := r.verdict(l.cfg.Verify)
			if err == nil {
				l.waiting <- r
				l.waiting, l.serving = nil, r
			}
			l.mu.Unlock()
			return err
		}
		wake := l.wake
		l.mu.Unlock()
		select {
		case <-wake:
		case <-timeout:
			return r.fail(fmt.Errorf("not accepting senders now: %w", ErrBusy), -1)
		case <-l.ctx.Done():
		}
	}
}

func (l *Listener) refused(err error) {
	l.mu.Lock()
	fn, log := l.cfg.OnRefused, l.cfg.Logger
	l.mu.Unlock()
	if fn != nil {
		fn(err)
		return
	}
	log.Warn("stream refused", "component", "replicate/stream", "err", err)
}
