// Package democlient drives the default guest's demo HTTP service the way
// a client of a highly available service would: over ONE keep-alive TCP
// connection, keeping the history of what it was told, so that after a
// failover or a migration it can check that nothing it saw was lost or
// repeated. The demo (scripts/demo.sh) uses it through cmd/democlient.
//
// The client speaks HTTP/1.1 on a net.Conn it owns, so there is no
// transparent reconnect: if the connection breaks, that is reported, never
// papered over.
package democlient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Client is one keep-alive connection to the demo service. It is not safe
// for concurrent use.
type Client struct {
	addr string
	conn net.Conn
	br   *bufio.Reader
	// Timeout bounds each request, failover included; default 60 s.
	Timeout time.Duration
	hist    History
}

// Dial connects to the demo service at addr (HOST:PORT).
func Dial(ctx context.Context, addr string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("democlient: %w", err)
	}
	return New(conn, addr), nil
}

// New makes a client of a connection to the demo service that the caller
// opened (from a network namespace, say); host is sent as the Host
// header. The client owns conn from then on.
func New(conn net.Conn, host string) *Client {
	return &Client{addr: host, conn: conn, br: bufio.NewReader(conn), Timeout: time.Minute}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// LocalAddr names the client's end of the connection (it must not change).
func (c *Client) LocalAddr() string { return c.conn.LocalAddr().String() }

// History is what the client was told, in order.
type History struct {
	Counter []int    // every value POST /incr answered
	Lines   []string // every line whose POST /append was answered
	LineNo  []int    // the line count each append answered
}

// History returns a copy of the history so far.
func (c *Client) History() History {
	return History{Counter: slices.Clone(c.hist.Counter), Lines: slices.Clone(c.hist.Lines), LineNo: slices.Clone(c.hist.LineNo)}
}

// Do sends one request on the connection and returns the body of its
// answer, which must be 200 OK and keep the connection open. It records
// nothing in the history: Incr and Append do.
func (c *Client) Do(method, path, body string) (string, error) {
	if err := c.conn.SetDeadline(time.Now().Add(c.Timeout)); err != nil {
		return "", err
	}
	req := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
		method, path, c.addr, len(body), body)
	if _, err := io.WriteString(c.conn, req); err != nil {
		return "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if resp.Close {
		return "", fmt.Errorf("%s %s: the server closed the connection", method, path)
	}
	return string(b), nil
}

// Incr is POST /incr: the counter's new value.
func (c *Client) Incr() (int, error) {
	s, err := c.Do("POST", "/incr", "")
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("POST /incr: not a number: %q", s)
	}
	c.hist.Counter = append(c.hist.Counter, n)
	return n, nil
}

// Append is POST /append: the file's line count after line was appended
// and fsynced.
func (c *Client) Append(line string) (int, error) {
	s, err := c.Do("POST", "/append", line)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("POST /append: not a number: %q", s)
	}
	c.hist.Lines = append(c.hist.Lines, line)
	c.hist.LineNo = append(c.hist.LineNo, n)
	return n, nil
}

// Log is GET /log: the file's lines.
func (c *Client) Log() ([]string, error) {
	s, err := c.Do("GET", "/log", "")
	if err != nil {
		return nil, err
	}
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return nil, nil
	}
	return strings.Split(s, "\n"), nil
}

// ErrHistory is wrapped by every history violation.
var ErrHistory = errors.New("broken history")

// Check says whether the history and the service's current log agree with
// what a client of one uninterrupted machine would see: every counter
// value one more than the one before (nothing repeated, nothing lost),
// line counts rising by one, and every acknowledged line in the log, in
// order, where its count said it was.
func (h History) Check(log []string) error {
	for i := 1; i < len(h.Counter); i++ {
		if h.Counter[i] != h.Counter[i-1]+1 {
			return fmt.Errorf("%w: counter went %d -> %d (answer %d)", ErrHistory, h.Counter[i-1], h.Counter[i], i)
		}
	}
	for i := 1; i < len(h.LineNo); i++ {
		if h.LineNo[i] != h.LineNo[i-1]+1 {
			return fmt.Errorf("%w: line count went %d -> %d (append %d)", ErrHistory, h.LineNo[i-1], h.LineNo[i], i)
		}
	}
	for i, l := range h.Lines {
		n := h.LineNo[i]
		if n < 1 || n > len(log) {
			return fmt.Errorf("%w: acknowledged line %q (number %d) is not in the log of %d lines", ErrHistory, l, n, len(log))
		}
		if log[n-1] != l {
			return fmt.Errorf("%w: line %d of the log is %q, but %q was acknowledged there", ErrHistory, n, log[n-1], l)
		}
	}
	return nil
}
