package witness

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"govmm/replicate/stream"
)

// ServerConfig parameterises a witness.
type ServerConfig struct {
	// Key is the pre-shared key every client must prove (required).
	Key []byte
	// StateDir holds the generations (created 0700 if missing, locked
	// while the witness runs).
	StateDir string
	// MaxLease caps the leases granted (default DefaultMaxLease). After a
	// restart every holder is granted its recorded lease again before
	// anyone may claim, so a long lease also delays failover after a
	// witness restart.
	MaxLease time.Duration
	// MaxVMs caps the VMs the witness protects (default 4096).
	MaxVMs int
	// MaxConns caps concurrent connections (default 1024).
	MaxConns int
	// HandshakeTimeout bounds a client's handshake (default 5s);
	// IdleTimeout drops a client that sends nothing for that long
	// (default 2m). Both are real time.
	HandshakeTimeout, IdleTimeout time.Duration
	// Clock is the lease clock (default BootClock).
	Clock  Clock
	Logger *slog.Logger
}

// Server is a witness: it grants generations of protected VMs and leases
// on them (docs/FENCING.md). Its whole state is a table of records, one
// per VM, guarded by one mutex: requests are applied one at a time, each
// new generation saved durably before it is granted.
//
// Goroutines: Serve's accept loop, and one goroutine per connection that
// reads a request, applies it under the mutex and writes the reply.
// Close stops them all and waits.
type Server struct {
	cfg ServerConfig
	log *slog.Logger
	st  *store

	mu  sync.Mutex // guards tab; a new generation's fsync happens under it
	tab *table

	connMu    sync.Mutex // guards conns, listeners, closed
	conns     map[net.Conn]struct{}
	listeners []net.Listener
	closed    bool
	failed    error // why the witness stopped serving on its own
	wg        sync.WaitGroup

	requests, grants, refused atomic.Uint64

	logMu       sync.Mutex // guards the refusal log limiter
	logSecond   time.Time
	logged      int
	logDropped  int
	refusalRate int
}

// ServerStats are the witness's counters.
type ServerStats struct {
	Requests uint64 // answered requests
	Grants   uint64 // generations granted since start
	Refused  uint64 // connections refused or dropped for bad input
	VMs      int
}

// NewServer opens and locks the state directory and loads the
// generations. A state file it cannot read is an error, never an empty
// start: forgetting generations could let a stale standby win one.
func NewServer(cfg ServerConfig) (*Server, error) {
	if len(cfg.Key) < stream.MinKeyLen {
		return nil, fmt.Errorf("witness: a key of at least %d bytes is required (--key-file)", stream.MinKeyLen)
	}
	if cfg.StateDir == "" {
		return nil, errors.New("witness: a state directory is required (--state)")
	}
	if cfg.MaxLease == 0 {
		cfg.MaxLease = DefaultMaxLease
	}
	if err := CheckLease(cfg.MaxLease); err != nil {
		return nil, fmt.Errorf("witness: max lease %v: %w", cfg.MaxLease, err)
	}
	if cfg.MaxVMs <= 0 {
		cfg.MaxVMs = 4096
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 1024
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 5 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * time.Minute
	}
	if cfg.Clock == nil {
		cfg.Clock = BootClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	st, recs, err := openStore(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("witness: %w", err)
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "witness"), st: st, conns: map[net.Conn]struct{}{}, refusalRate: 10}
	s.tab = newTable(recs, cfg.Clock.Now(), st.save, cfg.MaxLease, cfg.MaxVMs)
	for _, r := range recs {
		s.log.Info("generation loaded; claims wait one lease", "vm", r.VM, "generation", r.Generation, "holder", r.Holder, "lease", r.Lease)
	}
	return s, nil
}

// Records returns the witness's view of every VM.
func (s *Server) Records() []Record {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tab.records(s.cfg.Clock.Now())
}

// Stats returns the counters.
func (s *Server) Stats() ServerStats {
	s.mu.Lock()
	n := len(s.tab.recs)
	s.mu.Unlock()
	return ServerStats{Requests: s.requests.Load(), Grants: s.grants.Load(), Refused: s.refused.Load(), VMs: n}
}

// Serve accepts clients on l until Close; it returns nil after Close, or
// an error if the witness had to stop (its state on disk became
// uncertain: it must be restarted).
func (s *Server) Serve(l net.Listener) error {
	s.connMu.Lock()
	if s.closed {
		s.connMu.Unlock()
		l.Close()
		return nil
	}
	s.listeners = append(s.listeners, l)
	s.connMu.Unlock()
	for {
		nc, err := l.Accept()
		if err != nil {
			s.connMu.Lock()
			closed, failed := s.closed, s.failed
			s.connMu.Unlock()
			if failed != nil {
				return fmt.Errorf("witness: %w", failed)
			}
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("witness: accept: %w", err)
		}
		s.connMu.Lock()
		if s.closed || s.failed != nil || len(s.conns) >= s.cfg.MaxConns {
			full := !s.closed && s.failed == nil
			s.connMu.Unlock()
			nc.Close()
			if full {
				s.refuse(nc.RemoteAddr(), fmt.Errorf("%d connections already", s.cfg.MaxConns))
			}
			continue
		}
		s.conns[nc] = struct{}{}
		s.wg.Add(1)
		s.connMu.Unlock()
		go s.handle(nc)
	}
}

// Close stops accepting, drops every connection, waits for their
// goroutines and unlocks the state directory. Idempotent.
func (s *Server) Close() error {
	s.connMu.Lock()
	if s.closed {
		s.connMu.Unlock()
		return nil
	}
	s.closed = true
	for _, l := range s.listeners {
		l.Close()
	}
	for nc := range s.conns {
		nc.Close()
	}
	s.connMu.Unlock()
	s.wg.Wait()
	s.st.close()
	return nil
}

// refuse counts and logs (at most refusalRate a second) a refused client.
func (s *Server) refuse(remote net.Addr, err error) {
	s.refused.Add(1)
	s.logMu.Lock()
	defer s.logMu.Unlock()
	now := time.Now()
	if now.Sub(s.logSecond) >= time.Second {
		if s.logDropped > 0 {
			s.log.Warn("refused clients not logged", "count", s.logDropped)
		}
		s.logSecond, s.logged, s.logDropped = now, 0, 0
	}
	if s.logged >= s.refusalRate {
		s.logDropped++
		return
	}
	s.logged++
	s.log.Warn("refused a client", "remote", remote.String(), "err", err)
}

func (s *Server) handle(nc net.Conn) {
	defer s.wg.Done()
	defer func() {
		nc.Close()
		s.connMu.Lock()
		delete(s.conns, nc)
		s.connMu.Unlock()
	}()
	c := newConn(nc)
	_ = nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	if err := c.witnessHandshake(s.cfg.Key); err != nil {
		if s.isClosed() {
			return
		}
		s.refuse(nc.RemoteAddr(), fmt.Errorf("handshake: %w", err))
		if msg := handshakeRefusal(err); msg != "" {
			_ = c.write(frameError, appendErrorFrame(nil, msg))
		}
		return
	}
	for {
		_ = nc.SetDeadline(time.Now().Add(s.cfg.IdleTimeout))
		t, p, err := c.read()
		if err != nil {
			var ne net.Error
			switch {
			case s.isClosed(), errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
			case errors.As(err, &ne) && ne.Timeout():
				s.log.Debug("idle client dropped", "remote", nc.RemoteAddr().String())
			default:
				s.refuse(nc.RemoteAddr(), err)
			}
			return
		}
		if t != frameRequest {
			err = fmt.Errorf("got %v frame, want request: %w", t, ErrProtocol)
		}
		var q request
		if err == nil {
			q, err = parseRequest(p)
		}
		if err != nil {
			s.refuse(nc.RemoteAddr(), err)
			_ = nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
			_ = c.write(frameError, appendErrorFrame(nil, err.Error()))
			return
		}
		s.mu.Lock()
		rep, g := s.tab.apply(s.cfg.Clock.Now(), &q)
		broken := s.tab.broken
		s.mu.Unlock()
		if broken != nil {
			s.fail(broken)
			return
		}
		s.requests.Add(1)
		if g != nil {
			s.grants.Add(1)
			s.log.Info("generation granted", "vm", g.VM, "generation", g.Generation, "holder", g.Holder, "previous_holder", g.Previous)
		}
		if rep.result == resultError {
			s.log.Error("request refused", "vm", q.vm, "op", q.op.String(), "err", rep.message)
		}
		_ = nc.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
		if err := c.write(frameReply, appendReply(nil, &rep)); err != nil {
			return
		}
	}
}

// fail stops the witness for good: Serve returns err.
func (s *Server) fail(err error) {
	s.connMu.Lock()
	if s.failed == nil {
		s.failed = err
		s.log.Error("witness stopping: its state on disk is uncertain; restart it", "err", err)
	}
	for _, l := range s.listeners {
		l.Close()
	}
	for nc := range s.conns {
		nc.Close()
	}
	s.connMu.Unlock()
}

func (s *Server) isClosed() bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	return s.closed
}
