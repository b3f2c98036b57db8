package ctlapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeBackend is a small in-memory VMM. snapshot and migrate, when set,
// replace the default behaviour of those calls.
type fakeBackend struct {
	mu     sync.Mutex // guards paused
	paused bool

	snapshot func(ctx context.Context, path string) (SnapshotResult, error)
	migrate  func(ctx context.Context, to string, progress func(Progress)) (MigrateResult, error)
	stats    Stats
}

var _ Backend = (*fakeBackend)(nil)

func (f *fakeBackend) Info() Info {
	f.mu.Lock()
	defer f.mu.Unlock()
	state := "running"
	if f.paused {
		state = "paused"
	}
	return Info{
		Name: "test", State: state, VCPUs: 2, MemoryBytes: 256 << 20,
		Devices: []string{"uart0", "virtio-net0"}, Uptime: 90 * time.Second,
		Role: "primary", Peer: "10.0.0.2:7000",
	}
}

func (f *fakeBackend) Pause() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.paused {
		return fmt.Errorf("pause: %w: already paused", ErrConflict)
	}
	f.paused = true
	return nil
}

func (f *fakeBackend) Resume() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.paused {
		return fmt.Errorf("resume: %w: not paused", ErrConflict)
	}
	f.paused = false
	return nil
}

func (f *fakeBackend) Snapshot(ctx context.Context, path string) (SnapshotResult, error) {
	if f.snapshot != nil {
		return f.snapshot(ctx, path)
	}
	return SnapshotResult{Bytes: 4096 * 10, Pages: 100, ZeroPages: 90, Pause: 3 * time.Millisecond}, nil
}

func (f *fakeBackend) Migrate(ctx context.Context, req MigrateRequest, progress func(Progress)) (MigrateResult, error) {
	if f.migrate != nil {
		return f.migrate(ctx, req.To, progress)
	}
	progress(Progress{Round: 1, Phase: PhasePrecopy, RemainingPages: 10})
	progress(Progress{Round: 2, Phase: PhaseStopAndCopy, BytesSent: 40960})
	progress(Progress{Round: 2, Phase: PhaseDone, BytesSent: 45056})
	return MigrateResult{TotalTime: time.Second, Downtime: 20 * time.Millisecond, Rounds: 2, BytesSent: 45056, PagesSent: 11}, nil
}

func (f *fakeBackend) Stats() Stats { return f.stats }

// sockPath is a fresh socket path under a short temporary directory.
func sockPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctl")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "api.sock")
}

// serve starts a server for b and returns a client for it.
func serve(t *testing.T, b Backend) (*Server, *Client) {
	t.Helper()
	path := sockPath(t)
	s, err := Serve(t.Context(), path, b)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, s.Close()) })
	c := NewClient(path)
	t.Cleanup(c.Close)
	return s, c
}

// rawDo sends one raw HTTP request to the server at path.
func rawDo(t *testing.T, path, method, route string, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(t.Context(), method, "http://x"+route, body)
	require.NoError(t, err)
	resp, err := hc.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, b
}

func TestRoutes(t *testing.T) {
	t.Parallel()
	b := &fakeBackend{stats: Stats{Metrics: []Metric{
		{Name: "govmm_exits_total", Help: "vCPU exits.", Type: "counter", Labels: map[string]string{"reason": "io"}, Value: 42},
	}}}
	_, c := serve(t, b)
	ctx := t.Context()

	info, err := c.Info(ctx)
	require.NoError(t, err)
	assert.Equal(t, b.Info(), info)

	require.NoError(t, c.Pause(ctx))
	info, err = c.Info(ctx)
	require.NoError(t, err)
	assert.Equal(t, "paused", info.State)

	err = c.Pause(ctx)
	require.ErrorIs(t, err, ErrConflict, "pausing twice")
	var ae *APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, http.StatusConflict, ae.Status)
	assert.Equal(t, "pause: conflict: already paused", ae.Message)

	require.NoError(t, c.Resume(ctx))
	require.ErrorIs(t, c.Resume(ctx), ErrConflict, "resuming a running VM")

	snap, err := c.Snapshot(ctx, "/var/lib/govmm/snap.img")
	require.NoError(t, err)
	assert.Equal(t, SnapshotResult{Path: "/var/lib/govmm/snap.img", Bytes: 40960, Pages: 100, ZeroPages: 90, Pause: 3 * time.Millisecond}, snap)

	var got []Progress
	res, err := c.Migrate(ctx, MigrateRequest{To: "10.0.0.2:7000"}, func(p Progress) { got = append(got, p) })
	require.NoError(t, err)
	assert.Equal(t, MigrateResult{TotalTime: time.Second, Downtime: 20 * time.Millisecond, Rounds: 2, BytesSent: 45056, PagesSent: 11}, res)
	assert.Equal(t, []string{PhasePrecopy, PhaseStopAndCopy, PhaseDone}, phases(got))

	st, err := c.Stats(ctx)
	require.NoError(t, err)
	assert.Equal(t, b.stats, st)

	text, err := c.Metrics(ctx)
	require.NoError(t, err)
	assert.Equal(t, "# HELP govmm_exits_total vCPU exits.\n# TYPE govmm_exits_total counter\ngovmm_exits_total{reason=\"io\"} 42\n", text)
}

func phases(ps []Progress) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Phase)
	}
	return out
}

// TestSnapshotRelativePath checks that the client sends an absolute path:
// the VMM's working directory is not the caller's.
func TestSnapshotRelativePath(t *testing.T) {
	t.Parallel()
	var got string
	_, c := serve(t, &fakeBackend{snapshot: func(_ context.Context, path string) (SnapshotResult, error) {
		got = path
		return SnapshotResult{}, nil
	}})
	res, err := c.Snapshot(t.Context(), "snap.img")
	require.NoError(t, err)
	wd, err := os.Getwd()
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(wd, "snap.img"), got)
	assert.Equal(t, got, res.Path)
}

func TestHTTPErrors(t *testing.T) {
	t.Parallel()
	s, _ := serve(t, &fakeBackend{
		snapshot: func(context.Context, string) (SnapshotResult, error) {
			return SnapshotResult{}, errors.New("disk full")
		},
		migrate: func(context.Context, string, func(Progress)) (MigrateResult, error) {
			return MigrateResult{}, fmt.Errorf("migrate: %w: no dirty log", ErrNotSupported)
		},
	})
	tests := []struct {
		name, method, route, body string
		wantStatus                int
		wantError                 string // substring of the "error" field
	}{
		{"unknown route", "GET", "/nope", "", 404, "no such route: GET /nope"},
		{"trailing slash is another route", "GET", "/vm/", "", 404, "no such route"},
		{"wrong method", "POST", "/vm", "", 405, "method not allowed: POST /vm (use GET)"},
		{"get on a put route", "GET", "/vm/pause", "", 405, "use PUT"},
		{"malformed json", "PUT", "/vm/snapshot", `{"path": `, 400, "invalid request: body: unexpected EOF"},
		{"not an object", "PUT", "/vm/snapshot", `["/x"]`, 400, "invalid request: body: json: cannot unmarshal array"},
		{"unknown field", "PUT", "/vm/snapshot", `{"path": "/x", "force": true}`, 400, `unknown field "force"`},
		{"trailing data", "PUT", "/vm/snapshot", `{"path": "/x"} {}`, 400, "data after the JSON object"},
		{"empty body", "PUT", "/vm/snapshot", "", 400, "empty body"},
		{"null body", "PUT", "/vm/snapshot", "null", 400, `missing "path"`},
		{"relative path", "PUT", "/vm/snapshot", `{"path": "snap.img"}`, 400, "is not absolute"},
		{"wrong type", "PUT", "/vm/snapshot", `{"path": 7}`, 400, "cannot unmarshal number"},
		{"oversized body", "PUT", "/vm/snapshot", `{"path": "/` + strings.Repeat("a", MaxBodyBytes) + `"}`, 413, "request body too large"},
		{"backend error is 500", "PUT", "/vm/snapshot", `{"path": "/x"}`, 500, "disk full"},
		{"migrate without to", "PUT", "/vm/migrate", `{}`, 400, `missing "to"`},
		{"migrate to no port", "PUT", "/vm/migrate", `{"to": "host"}`, 400, `"host" is not host:port`},
		{"invalid utf-8", "PUT", "/vm/migrate", "{\"to\": \"\xff\"}", 400, "is not host:port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp, body := rawDo(t, s.Path(), tt.method, tt.route, strings.NewReader(tt.body))
			assert.Equal(t, tt.wantStatus, resp.StatusCode)
			assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
			var eb errorBody
			require.NoError(t, json.Unmarshal(body, &eb), "body %q", body)
			assert.Contains(t, eb.Error, tt.wantError)
			if tt.wantStatus == 405 {
				assert.NotEmpty(t, resp.Header.Get("Allow"))
			}
		})
	}

	// A backend error after the stream has started arrives as its last
	// line, with the status it would have had.
	_, err := NewClient(s.Path()).Migrate(t.Context(), MigrateRequest{To: "h:1"}, nil)
	require.ErrorIs(t, err, ErrNotSupported)
	assert.EqualError(t, err, "migrate: not supported: no dirty log")
}

// TestConcurrentLongOpsRefused checks that a second migration or a
// snapshot during a migration is 409, and that the slot frees afterwards.
func TestConcurrentLongOpsRefused(t *testing.T) {
	t.Parallel()
	started, release := make(chan struct{}), make(chan struct{})
	_, c := serve(t, &fakeBackend{migrate: func(ctx context.Context, _ string, progress func(Progress)) (MigrateResult, error) {
		progress(Progress{Round: 1, Phase: PhasePrecopy})
		close(started)
		<-release
		return MigrateResult{Rounds: 1}, nil
	}})
	ctx := t.Context()
	done := make(chan error, 1)
	go func() {
		_, err := c.Migrate(ctx, MigrateRequest{To: "a:1"}, nil)
		done <- err
	}()
	<-started

	_, err := c.Migrate(ctx, MigrateRequest{To: "b:1"}, nil)
	require.ErrorIs(t, err, ErrConflict)
	assert.Contains(t, err.Error(), "already in progress")
	_, err = c.Snapshot(ctx, "/snap")
	require.ErrorIs(t, err, ErrConflict)
	_, err = c.Info(ctx)
	require.NoError(t, err, "other routes stay available")

	close(release)
	require.NoError(t, <-done)
	_, err = c.Snapshot(ctx, "/snap")
	require.NoError(t, err, "the slot is free again")
}

// TestClientCancelPropagates checks that a client that gives up cancels
// the backend's context, for a snapshot and mid-stream for a migration.
func TestClientCancelPropagates(t *testing.T) {
	t.Parallel()
	backendErr := make(chan error, 2)
	started := make(chan struct{}, 2)
	_, c := serve(t, &fakeBackend{
		snapshot: func(ctx context.Context, _ string) (SnapshotResult, error) {
			started <- struct{}{}
			<-ctx.Done()
			backendErr <- ctx.Err()
			return SnapshotResult{}, ctx.Err()
		},
		migrate: func(ctx context.Context, _ string, progress func(Progress)) (MigrateResult, error) {
			progress(Progress{Round: 1, Phase: PhasePrecopy})
			<-ctx.Done()
			backendErr <- ctx.Err()
			return MigrateResult{}, ctx.Err()
		},
	})

	t.Run("snapshot", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		go func() { <-started; cancel() }()
		_, err := c.Snapshot(ctx, "/snap")
		require.ErrorIs(t, err, context.Canceled)
		assertCanceled(t, backendErr)
	})
	t.Run("migrate", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		_, err := c.Migrate(ctx, MigrateRequest{To: "a:1"}, func(Progress) { cancel() })
		require.ErrorIs(t, err, context.Canceled)
		assertCanceled(t, backendErr)
	})
}

func assertCanceled(t *testing.T, backendErr chan error) {
	t.Helper()
	select {
	case err := <-backendErr:
		assert.ErrorIs(t, err, context.Canceled)
	case <-time.After(10 * time.Second):
		t.Fatal("backend's context was not cancelled")
	}
}

func TestServeSocketFile(t *testing.T) {
	t.Parallel()
	t.Run("mode 0600 and removed on close", func(t *testing.T) {
		path := sockPath(t)
		s, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		fi, err := os.Lstat(path)
		require.NoError(t, err)
		assert.Equal(t, fs.ModeSocket|0o600, fi.Mode())
		entries, err := os.ReadDir(filepath.Dir(path))
		require.NoError(t, err)
		assert.Len(t, entries, 1, "no temporary directory left behind")
		require.NoError(t, s.Close())
		require.NoError(t, s.Close(), "Close is idempotent")
		_, err = os.Lstat(path)
		assert.ErrorIs(t, err, fs.ErrNotExist)
	})
	t.Run("creates the directory", func(t *testing.T) {
		path := filepath.Join(filepath.Dir(sockPath(t)), "run", "govmm", "api.sock")
		s, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		defer s.Close()
		fi, err := os.Stat(filepath.Dir(path))
		require.NoError(t, err)
		assert.Equal(t, fs.ModeDir|0o700, fi.Mode())
	})
	t.Run("stale socket replaced", func(t *testing.T) {
		path := sockPath(t)
		ln, err := net.Listen("unix", path)
		require.NoError(t, err)
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		require.NoError(t, ln.Close()) // as a crashed server leaves it
		_, err = os.Lstat(path)
		require.NoError(t, err, "the stale socket file is there")
		_, err = NewClient(path).Info(t.Context())
		require.ErrorIs(t, err, ErrNoServer)
		assert.EqualError(t, err, "no VM listening on "+path+": connection refused")

		s, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		defer s.Close()
		_, err = NewClient(path).Info(t.Context())
		assert.NoError(t, err)
	})
	t.Run("live socket refused", func(t *testing.T) {
		path := sockPath(t)
		s, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		defer s.Close()
		_, err = Serve(t.Context(), path, &fakeBackend{})
		require.ErrorIs(t, err, ErrInUse)
		_, err = NewClient(path).Info(t.Context())
		assert.NoError(t, err, "the first server still answers")
	})
	t.Run("not a socket refused", func(t *testing.T) {
		path := sockPath(t)
		require.NoError(t, os.WriteFile(path, []byte("precious"), 0o644))
		_, err := Serve(t.Context(), path, &fakeBackend{})
		require.ErrorContains(t, err, "exists and is not a socket")
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.Equal(t, "precious", string(b))
	})
	t.Run("path too long", func(t *testing.T) {
		_, err := Serve(t.Context(), "/tmp/"+strings.Repeat("x", 120), &fakeBackend{})
		require.ErrorContains(t, err, "path longer than 107 bytes")
	})
	t.Run("close leaves a successor's socket alone", func(t *testing.T) {
		path := sockPath(t)
		s1, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		require.NoError(t, os.Remove(path)) // an operator cleaned up
		s2, err := Serve(t.Context(), path, &fakeBackend{})
		require.NoError(t, err)
		defer s2.Close()
		require.NoError(t, s1.Close())
		_, err = NewClient(path).Info(t.Context())
		assert.NoError(t, err)
	})
}

func TestNoServer(t *testing.T) {
	t.Parallel()
	path := sockPath(t)
	_, err := NewClient(path).Info(t.Context())
	require.ErrorIs(t, err, ErrNoServer)
	assert.EqualError(t, err, "no VM listening on "+path+": no such file or directory")
}

// TestCloseCancelsInFlight checks that Close cancels a running backend
// call and returns only after it has.
func TestCloseCancelsInFlight(t *testing.T) {
	t.Parallel()
	started := make(chan struct{})
	var returned bool
	path := sockPath(t)
	s, err := Serve(t.Context(), path, &fakeBackend{snapshot: func(ctx context.Context, _ string) (SnapshotResult, error) {
		close(started)
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond) // Close must wait through this
		returned = true
		return SnapshotResult{}, ctx.Err()
	}})
	require.NoError(t, err)
	go func() { _, _ = NewClient(path).Snapshot(context.Background(), "/snap") }()
	<-started
	require.NoError(t, s.Close())
	assert.True(t, returned, "Close returned before the backend call")
}

// TestContextStopsServer checks that Serve's ctx bounds the server's life.
func TestContextStopsServer(t *testing.T) {
	t.Parallel()
	path := sockPath(t)
	ctx, cancel := context.WithCancel(t.Context())
	s, err := Serve(ctx, path, &fakeBackend{})
	require.NoError(t, err)
	cancel()
	require.Eventually(t, func() bool {
		_, err := os.Lstat(path)
		return errors.Is(err, fs.ErrNotExist)
	}, 10*time.Second, 5*time.Millisecond)
	require.NoError(t, s.Close())
	_, err = NewClient(path).Info(t.Context())
	assert.ErrorIs(t, err, ErrNoServer)
}

func TestProgressQueueCoalesces(t *testing.T) {
	t.Parallel()
	q := newProgressQueue()
	for i := 1; i <= 2000; i++ {
		q.push(Progress{Round: i, Phase: PhasePrecopy})
	}
	q.push(Progress{Round: 2001, Phase: PhaseStopAndCopy})
	q.push(Progress{Round: 2002, Phase: PhaseDone})
	q.close()
	q.push(Progress{Round: 9999}) // after close: dropped
	batch, more := q.next()
	require.True(t, more)
	require.Len(t, batch, queueCoalesce+2)
	for i := 1; i < len(batch); i++ {
		assert.Less(t, batch[i-1].Round, batch[i].Round, "order kept")
	}
	assert.Equal(t, 2000, batch[queueCoalesce-1].Round, "the latest precopy update survives")
	assert.Equal(t, []string{PhaseStopAndCopy, PhaseDone}, phases(batch[queueCoalesce:]))
	_, more = q.next()
	assert.False(t, more)
}

// FuzzServeHTTP feeds arbitrary methods, paths and bodies to the handler:
// it must answer with a status and a JSON error, never panic.
func FuzzServeHTTP(f *testing.F) {
	f.Add("PUT", "/vm/snapshot", []byte(`{"path":"/x"}`))
	f.Add("PUT", "/vm/migrate", []byte(`{"to":"a:1"}`))
	f.Add("GET", "/vm", []byte(nil))
	f.Add("PUT", "/vm/snapshot", []byte(`{"path":`))
	s := &Server{b: &fakeBackend{}}
	f.Fuzz(func(t *testing.T, method, path string, body []byte) {
		req, err := http.NewRequest(method, "http://x/", strings.NewReader(string(body)))
		if err != nil {
			return
		}
		req.URL.Path = path
		w := httptest.NewRecorder()
		s.ServeHTTP(w, req)
		if w.Code/100 == 2 {
			return
		}
		var eb errorBody
		if err := json.Unmarshal(w.Body.Bytes(), &eb); err != nil || eb.Error == "" {
			t.Fatalf("%s %s: status %d with body %q", method, path, w.Code, w.Body.Bytes())
		}
	})
}

func TestDefaultSocketPath(t *testing.T) {
	t.Setenv("GOVMM_API_SOCK", "/srv/vm1.sock")
	assert.Equal(t, "/srv/vm1.sock", DefaultSocketPath())
	t.Setenv("GOVMM_API_SOCK", "")
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	want := "/run/user/1000/govmm/govmm.sock"
	if os.Geteuid() == 0 {
		want = "/run/govmm/govmm.sock"
	}
	assert.Equal(t, want, DefaultSocketPath())
	t.Setenv("XDG_RUNTIME_DIR", "")
	assert.Equal(t, "/run/govmm/govmm.sock", DefaultSocketPath())
}
