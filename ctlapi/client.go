package ctlapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"syscall"
)

// Client talks to a Server over its unix socket. Its methods are safe for
// concurrent use. Errors the server reported are *APIError (which unwraps
// to ErrConflict, ErrInvalid, ...); when nothing listens on the socket they
// wrap ErrNoServer and read "no VM listening on PATH: REASON".
type Client struct {
	hc *http.Client
}

// NewClient returns a client for the server on sockPath. It connects on
// the first call.
func NewClient(sockPath string) *Client {
	c := &Client{}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", sockPath)
			if err != nil {
				return nil, &dialError{path: sockPath, err: err}
			}
			return conn, nil
		},
		MaxIdleConns:       2,
		DisableCompression: true,
	}
	c.hc = &http.Client{Transport: tr}
	return c
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// dialError is a failure to reach the socket.
type dialError struct {
	path string
	err  error
}

func (e *dialError) Error() string {
	// The errno alone: net's text would repeat the path.
	var errno syscall.Errno
	cause := e.err.Error()
	if errors.As(e.err, &errno) {
		cause = errno.Error()
	}
	if e.noServer() {
		return fmt.Sprintf("no VM listening on %s: %s", e.path, cause)
	}
	return fmt.Sprintf("connect to %s: %s", e.path, cause)
}

func (e *dialError) noServer() bool {
	return errors.Is(e.err, syscall.ENOENT) || errors.Is(e.err, syscall.ECONNREFUSED)
}

func (e *dialError) Unwrap() []error {
	if e.noServer() {
		return []error{ErrNoServer, e.err}
	}
	return []error{e.err}
}

// Info returns GET /vm.
func (c *Client) Info(ctx context.Context) (Info, error) {
	var info Info
	err := c.do(ctx, http.MethodGet, "/vm", nil, &info)
	return info, err
}

// Pause sends PUT /vm/pause.
func (c *Client) Pause(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/vm/pause", nil, nil)
}

// Resume sends PUT /vm/resume.
func (c *Client) Resume(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/vm/resume", nil, nil)
}

// Snapshot asks the VMM to write a snapshot to path. A relative path is
// made absolute here, against this process's working directory, since the
// VMM's differs. Cancelling ctx cancels the snapshot.
func (c *Client) Snapshot(ctx context.Context, path string) (SnapshotResult, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return SnapshotResult{}, fmt.Errorf("snapshot: %w", err)
	}
	var res SnapshotResult
	err = c.do(ctx, http.MethodPut, "/vm/snapshot", snapshotRequest{Path: abs}, &res)
	return res, err
}

// Replicate starts protecting the VM with the standby at to; it returns
// once the guest is protected. It calls progress, if not nil, for each
// update of the initial sync, on the calling goroutine.
func (c *Client) Replicate(ctx context.Context, req ReplicateRequest, progress func(Progress)) error {
	var res ReplicateResult
	return c.progressStream(ctx, "replicate", "/vm/replicate", req, progress, &res)
}

// StopReplication ends replication.
func (c *Client) StopReplication(ctx context.Context) error {
	return c.do(ctx, http.MethodPut, "/vm/replicate/stop", nil, nil)
}

// maxLine caps one NDJSON line of a migration's progress.
const maxLine = 1 << 20

// Migrate live-migrates the VM to req.To (host:port). It calls progress,
// if not nil, for each update in the order the server sent them, on the
// calling goroutine. Cancelling ctx cancels the migration.
func (c *Client) Migrate(ctx context.Context, req MigrateRequest, progress func(Progress)) (MigrateResult, error) {
	var res MigrateResult
	err := c.progressStream(ctx, "migrate", "/vm/migrate", req, progress, &res)
	return res, err
}

// progressEventIn is a progressEvent as the client reads it.
type progressEventIn struct {
	Progress *Progress       `json:"progress"`
	Result   json.RawMessage `json:"result"`
	Error    string          `json:"error"`
	Status   int             `json:"status"`
}

// progressStream sends a request whose answer is an NDJSON progress
// stream, calls progress for each update and decodes the result into res.
func (c *Client) progressStream(ctx context.Context, op, path string, req any, progress func(Progress), res any) error {
	resp, err := c.send(ctx, http.MethodPut, path, req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), NDJSONContentType) {
		return fmt.Errorf("%s: response is %q, want %s", op, resp.Header.Get("Content-Type"), NDJSONContentType)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 4096), maxLine)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var ev progressEventIn
		if err := json.Unmarshal(line, &ev); err != nil {
			return fmt.Errorf("%s: bad progress line: %w", op, err)
		}
		switch {
		case ev.Progress != nil:
			if progress != nil {
				progress(*ev.Progress)
			}
		case ev.Result != nil:
			if err := json.Unmarshal(ev.Result, res); err != nil {
				return fmt.Errorf("%s: bad result: %w", op, err)
			}
			return nil
		case ev.Error != "":
			return &APIError{Status: ev.Status, Message: ev.Error}
		default:
			return fmt.Errorf("%s: empty progress line", op)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	return fmt.Errorf("%s: stream ended without a result: %w", op, io.ErrUnexpectedEOF)
}

// Stats returns GET /stats.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var st Stats
	err := c.do(ctx, http.MethodGet, "/stats", nil, &st)
	return st, err
}

// Metrics returns GET /metrics: Prometheus text.
func (c *Client) Metrics(ctx context.Context) (string, error) {
	resp, err := c.send(ctx, http.MethodGet, "/metrics", nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("metrics: %w", err)
	}
	return string(b), nil
}

// do sends a request and decodes a JSON response into out (if not nil).
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

// send sends a request and returns a 2xx response, or the error that a
// non-2xx response carries.
func (c *Client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	// The host is a placeholder; the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, method, "http://govmm"+path, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, ctxErr
		}
		var de *dialError
		if errors.As(err, &de) {
			return nil, de
		}
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, MaxBodyBytes))
	var eb errorBody
	if json.Unmarshal(b, &eb) != nil || eb.Error == "" {
		eb.Error = fmt.Sprintf("%s %s: %s", method, path, resp.Status)
	}
	return nil, &APIError{Status: resp.StatusCode, Message: eb.Error}
}
