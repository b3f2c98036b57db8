package ctlapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// maxSockPath is the longest path a unix socket can bind to: sun_path is
// 108 bytes with the terminating NUL (unix(7)).
const maxSockPath = 107

// Server serves the control API on a unix socket.
type Server struct {
	b    Backend
	path string
	sock os.FileInfo // the socket file we created; Close removes only that
	ln   net.Listener
	http *http.Server

	cancel context.CancelFunc // cancels every request's context
	served chan struct{}      // closed when http.Serve has returned
	busy   atomic.Bool        // a snapshot or a migration runs

	mu       sync.Mutex     // guards closed and the Add side of handlers
	closed   bool           // no new handler may start
	handlers sync.WaitGroup // requests in flight (each may be in the backend)

	closeOnce sync.Once
	closeErr  error
}

// Serve listens on the unix socket sockPath and serves b there until Close
// is called or ctx is done. It creates sockPath's directory (mode 0700) if
// missing. It refuses (ErrInUse) if a live server already listens on
// sockPath, and refuses a sockPath that exists and is not a socket; a stale
// socket, left by a server that died, is replaced. The socket is mode 0600
// from the moment it can be reached: it is bound in a private temporary
// directory and renamed into place.
func Serve(ctx context.Context, sockPath string, b Backend) (*Server, error) {
	ln, sock, err := listenUnix(sockPath)
	if err != nil {
		return nil, err
	}
	base, cancel := context.WithCancel(ctx)
	s := &Server{
		b:      b,
		path:   sockPath,
		sock:   sock,
		ln:     ln,
		cancel: cancel,
		served: make(chan struct{}),
	}
	s.http = &http.Server{
		Handler:           s,
		BaseContext:       func(net.Listener) context.Context { return base },
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
	}
	go func() {
		defer close(s.served)
		_ = s.http.Serve(ln) // always ErrServerClosed or a listener error after Close
	}()
	go func() {
		select {
		case <-ctx.Done():
			_ = s.Close()
		case <-s.served:
		}
	}()
	return s, nil
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Close stops serving: it cancels the context of every request in flight
// (so a running snapshot or migration stops), closes the listener and all
// connections, waits until every backend call has returned, and removes the
// socket file if it is still the one Serve created. Close is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.closeErr = s.http.Close()
		<-s.served
		s.handlers.Wait()
		if fi, err := os.Lstat(s.path); err == nil && os.SameFile(fi, s.sock) {
			if err := os.Remove(s.path); err != nil && s.closeErr == nil {
				s.closeErr = fmt.Errorf("remove api socket: %w", err)
			}
		}
	})
	return s.closeErr
}

// listenUnix binds sockPath as described in Serve.
func listenUnix(sockPath string) (ln net.Listener, sock os.FileInfo, err error) {
	if len(sockPath) > maxSockPath {
		return nil, nil, fmt.Errorf("api socket %s: path longer than %d bytes", sockPath, maxSockPath)
	}
	dir := filepath.Dir(sockPath)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	if err := checkStale(sockPath); err != nil {
		return nil, nil, err
	}
	tmpDir, err := os.MkdirTemp(dir, ".ctl")
	if err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	if len(tmp) > maxSockPath {
		return nil, nil, fmt.Errorf("api socket %s: path too long to bind beside it (%s is over %d bytes)", sockPath, tmp, maxSockPath)
	}
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			l.Close()
		}
	}()
	// The file moves, so the listener must not unlink its old name; Close
	// removes the new one.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(tmp, 0o600); err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	if err := os.Rename(tmp, sockPath); err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	if sock, err = os.Lstat(sockPath); err != nil {
		return nil, nil, fmt.Errorf("api socket: %w", err)
	}
	ok = true
	return l, sock, nil
}

// checkStale returns nil if sockPath is absent or a socket nobody listens
// on (which the rename in listenUnix then replaces). Another server starting
// between this check and the rename would lose its name; two VMMs sharing a
// socket path is an operator error that this catches in all other cases.
func checkStale(sockPath string) error {
	fi, err := os.Lstat(sockPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("api socket: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("api socket %s: exists and is not a socket", sockPath)
	}
	c, err := net.DialTimeout("unix", sockPath, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("api socket %s: %w: another server is listening there", sockPath, ErrInUse)
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return nil // stale
	}
	// EAGAIN (a full backlog) means somebody is there; anything else we
	// cannot judge, so leave the file alone.
	return fmt.Errorf("api socket %s: cannot tell whether a server listens there: %w", sockPath, err)
}

// route is one path's handler and the one method it answers.
type route struct {
	method string
	h      func(s *Server, w http.ResponseWriter, r *http.Request)
}

var routes = map[string]route{
	"/vm":                {http.MethodGet, (*Server).getInfo},
	"/vm/pause":          {http.MethodPut, (*Server).putPause},
	"/vm/resume":         {http.MethodPut, (*Server).putResume},
	"/vm/snapshot":       {http.MethodPut, (*Server).putSnapshot},
	"/vm/migrate":        {http.MethodPut, (*Server).putMigrate},
	"/vm/replicate":      {http.MethodPut, (*Server).putReplicate},
	"/vm/replicate/stop": {http.MethodPut, (*Server).putReplicateStop},
	"/stats":             {http.MethodGet, (*Server).getStats},
	"/metrics":           {http.MethodGet, (*Server).getMetrics},
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		writeError(w, fmt.Errorf("server closing"))
		return
	}
	s.handlers.Add(1)
	s.mu.Unlock()
	defer s.handlers.Done()

	rt, ok := routes[r.URL.Path]
	if !ok {
		writeError(w, fmt.Errorf("%w: %s %s", ErrNotFound, r.Method, r.URL.Path))
		return
	}
	if r.Method != rt.method {
		w.Header().Set("Allow", rt.method)
		writeError(w, fmt.Errorf("%w: %s %s (use %s)", ErrNotAllowed, r.Method, r.URL.Path, rt.method))
		return
	}
	rt.h(s, w, r)
}

func (s *Server) getInfo(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.b.Info())
}

func (s *Server) putPause(w http.ResponseWriter, _ *http.Request) {
	if err := s.b.Pause(); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) putResume(w http.ResponseWriter, _ *http.Request) {
	if err := s.b.Resume(); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// snapshotRequest is the body of PUT /vm/snapshot.
type snapshotRequest struct {
	Path string `json:"path"`
}

// putReplicate starts protecting the VM with a standby (optional
// backend capability).
func (s *Server) putReplicate(w http.ResponseWriter, r *http.Request) {
	rb, ok := s.b.(ReplicationBackend)
	if !ok {
		writeError(w, fmt.Errorf("%w: this VMM cannot replicate", ErrNotSupported))
		return
	}
	var req ReplicateRequest
	if err := decodeBody(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	if req.To == "" {
		writeError(w, fmt.Errorf(`%w: replicate: missing "to"`, ErrInvalid))
		return
	}
	streamProgress(w, r, func(ctx context.Context, progress func(Progress)) (any, error) {
		if err := rb.StartReplication(ctx, req, progress); err != nil {
			return nil, err
		}
		return ReplicateResult{To: req.To}, nil
	})
}

// putReplicateStop ends replication; the guest runs on unprotected.
func (s *Server) putReplicateStop(w http.ResponseWriter, _ *http.Request) {
	rb, ok := s.b.(ReplicationBackend)
	if !ok {
		writeError(w, fmt.Errorf("%w: this VMM cannot replicate", ErrNotSupported))
		return
	}
	if err := rb.StopReplication(); err != nil {
		writeError(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// errBusy answers a second snapshot or migration.
var errBusy = fmt.Errorf("%w: a snapshot or migration is already in progress", ErrConflict)

func (s *Server) putSnapshot(w http.ResponseWriter, r *http.Request) {
	var req snapshotRequest
	if err := decodeBody(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	switch {
	case req.Path == "":
		writeError(w, fmt.Errorf(`%w: snapshot: missing "path"`, ErrInvalid))
		return
	case !filepath.IsAbs(req.Path):
		// The VMM's working directory is not the caller's.
		writeError(w, fmt.Errorf("%w: snapshot: path %q is not absolute", ErrInvalid, req.Path))
		return
	}
	if !s.busy.CompareAndSwap(false, true) {
		writeError(w, errBusy)
		return
	}
	// The slot is free before the answer goes out: its reader may start
	// the next one at once.
	release := sync.OnceFunc(func() { s.busy.Store(false) })
	defer release()
	res, err := s.b.Snapshot(r.Context(), req.Path)
	release()
	if err != nil {
		writeError(w, err)
		return
	}
	if res.Path == "" {
		res.Path = req.Path
	}
	writeJSON(w, http.StatusOK, res)
}

// progressEvent is one NDJSON line of the response of a long operation
// (PUT /vm/migrate, PUT /vm/replicate): exactly one field is set.
// Progress lines come first, in the order the backend reported them; the
// last line is a result or an error (with the status the error would have
// had as a plain response).
type progressEvent struct {
	Progress *Progress `json:"progress,omitempty"`
	Result   any       `json:"result,omitempty"`
	Error    string    `json:"error,omitempty"`
	Status   int       `json:"status,omitempty"`
}

// NDJSONContentType is the content type of a progress stream.
const NDJSONContentType = "application/x-ndjson"

func (s *Server) putMigrate(w http.ResponseWriter, r *http.Request) {
	var req MigrateRequest
	if err := decodeBody(w, r, &req); err != nil {
		writeError(w, err)
		return
	}
	if req.To == "" {
		writeError(w, fmt.Errorf(`%w: migrate: missing "to"`, ErrInvalid))
		return
	}
	if _, _, err := net.SplitHostPort(req.To); err != nil {
		writeError(w, fmt.Errorf("%w: migrate: %q is not host:port", ErrInvalid, req.To))
		return
	}
	if !s.busy.CompareAndSwap(false, true) {
		writeError(w, errBusy)
		return
	}
	// The slot is free once the backend returns, before the last line
	// goes out: a client that reads the result may start the next one.
	release := sync.OnceFunc(func() { s.busy.Store(false) })
	defer release()
	streamProgress(w, r, func(ctx context.Context, progress func(Progress)) (any, error) {
		res, err := s.b.Migrate(ctx, req, progress)
		release()
		return &res, err
	})
}

// streamProgress answers r with an NDJSON stream (progressEvent): what run
// reports through its progress callback, then its result or its error.
func streamProgress(w http.ResponseWriter, r *http.Request, run func(ctx context.Context, progress func(Progress)) (any, error)) {
	w.Header().Set("Content-Type", NDJSONContentType)
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush() // the client learns at once that the operation started
	enc := json.NewEncoder(w)
	send := func(ev progressEvent) error {
		if err := enc.Encode(ev); err != nil {
			return err
		}
		return rc.Flush()
	}

	// The backend's progress callback must never wait for this client, so
	// updates go through a queue that one goroutine drains. After a write
	// error (the client left, which also cancels r.Context()) it keeps
	// draining without writing.
	q := newProgressQueue()
	written := make(chan struct{})
	go func() {
		defer close(written)
		var werr error
		for {
			batch, more := q.next()
			for i := range batch {
				if werr == nil {
					werr = send(progressEvent{Progress: &batch[i]})
				}
			}
			if !more {
				return
			}
		}
	}()
	res, err := run(r.Context(), q.push)
	q.close()
	<-written
	if err != nil {
		_ = send(progressEvent{Error: err.Error(), Status: statusOf(err)})
		return
	}
	_ = send(progressEvent{Result: res})
}

func (s *Server) getStats(w http.ResponseWriter, _ *http.Request) {
	st := s.b.Stats()
	st.Metrics = SortMetrics(st.Metrics)
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) getMetrics(w http.ResponseWriter, _ *http.Request) {
	writeMetrics(w, s.b.Stats())
}

// decodeBody reads r's body, at most MaxBodyBytes, as exactly one JSON
// object with no unknown fields into v.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	body := http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil {
		// Anything but white space after the object is an error too.
		var extra json.RawMessage
		if err = dec.Decode(&extra); err == io.EOF {
			return nil
		} else if err == nil {
			err = errors.New("data after the JSON object")
		}
	}
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		return fmt.Errorf("%w: over %d bytes", ErrTooLarge, MaxBodyBytes)
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: empty body, want a JSON object", ErrInvalid)
	}
	return fmt.Errorf("%w: body: %v", ErrInvalid, err)
}

// errorBody is every error response's body.
type errorBody struct {
	Error string `json:"error"`
}

func writeError(w http.ResponseWriter, err error) {
	writeJSON(w, statusOf(err), errorBody{err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.Marshal(errorBody{fmt.Sprintf("encode response: %v", err)})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// Progress updates queued beyond queueCoalesce replace the last one while
// the phase stays the same, and beyond queueMax replace it regardless, so a
// slow client costs bounded memory and sees the latest state in order.
const (
	queueCoalesce = 256
	queueMax      = 1024
)

// progressQueue hands progress updates from the backend to the writer
// without ever blocking the backend.
type progressQueue struct {
	mu     sync.Mutex // guards items and closed
	items  []Progress
	closed bool
	wake   chan struct{} // capacity 1: "items or closed changed"
}

func newProgressQueue() *progressQueue {
	return &progressQueue{wake: make(chan struct{}, 1)}
}

// push queues p; after close it drops p.
func (q *progressQueue) push(p Progress) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	n := len(q.items)
	if n >= queueMax || (n >= queueCoalesce && q.items[n-1].Phase == p.Phase) {
		q.items[n-1] = p
	} else {
		q.items = append(q.items, p)
	}
	q.signal()
}

func (q *progressQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.closed = true
	q.signal()
}

func (q *progressQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// next waits for updates and returns them in order; more is false once
// the queue is closed and empty.
func (q *progressQueue) next() (batch []Progress, more bool) {
	for {
		q.mu.Lock()
		batch, q.items = q.items, nil
		closed := q.closed
		q.mu.Unlock()
		if len(batch) > 0 {
			return batch, true
		}
		if closed {
			return nil, false
		}
		<-q.wake
	}
}
