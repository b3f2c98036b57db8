package demo

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func newTestServer(t *testing.T, logPath string) (*httptest.Server, *service) {
	t.Helper()
	s, err := openService(logPath)
	require.NoError(t, err)
	srv := httptest.NewServer(s.handler())
	t.Cleanup(func() {
		srv.Close()
		s.Close()
	})
	return srv, s
}

func do(t *testing.T, c *http.Client, method, url, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	resp, err := c.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, string(b)
}

func TestIncrConcurrent(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t, filepath.Join(t.TempDir(), "log.txt"))
	const workers, each = 8, 50
	seen := make(chan int, workers*each)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				code, body := do(t, srv.Client(), "POST", srv.URL+"/incr", "")
				assert.Equal(t, http.StatusOK, code)
				assert.True(t, strings.HasSuffix(body, "\n"))
				n, err := strconv.Atoi(strings.TrimSuffix(body, "\n"))
				assert.NoError(t, err)
				seen <- n
			}
		}()
	}
	wg.Wait()
	close(seen)
	got := map[int]bool{}
	for n := range seen {
		assert.False(t, got[n], "value %d handed out twice", n)
		got[n] = true
	}
	for i := 1; i <= workers*each; i++ {
		assert.True(t, got[i], "value %d never handed out", i)
	}
}

func TestAppendAndLog(t *testing.T) {
	t.Parallel()
	logPath := filepath.Join(t.TempDir(), "log.txt")
	srv, _ := newTestServer(t, logPath)
	c := srv.Client()

	for i, body := range []string{"first", "second\n", "third\r\n", ""} {
		code, got := do(t, c, "POST", srv.URL+"/append", body)
		require.Equal(t, http.StatusOK, code, got)
		assert.Equal(t, fmt.Sprintf("%d\n", i+1), got)
	}
	want := "first\nsecond\nthird\n\n"
	code, got := do(t, c, "GET", srv.URL+"/log", "")
	assert.Equal(t, http.StatusOK, code)
	assert.Equal(t, want, got)
	// The reply came after fsync: the file holds the lines now.
	disk, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Equal(t, want, string(disk))
}

func TestAppendConcurrentLinesIntact(t *testing.T) {
	t.Parallel()
	logPath := filepath.Join(t.TempDir(), "log.txt")
	srv, _ := newTestServer(t, logPath)
	line := strings.Repeat("x", 4000) // larger than a pipe atomic write
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 20 {
				code, _ := do(t, srv.Client(), "POST", srv.URL+"/append", fmt.Sprintf("%d-%d-%s", w, i, line))
				assert.Equal(t, http.StatusOK, code)
			}
		}()
	}
	wg.Wait()
	disk, err := os.ReadFile(logPath)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSuffix(string(disk), "\n"), "\n")
	assert.Len(t, lines, 80)
	for _, l := range lines {
		assert.True(t, strings.HasSuffix(l, line), "torn line %.20q", l)
	}
}

func TestAppendRejectsBadInput(t *testing.T) {
	t.Parallel()
	logPath := filepath.Join(t.TempDir(), "log.txt")
	srv, _ := newTestServer(t, logPath)
	tests := []struct {
		name, body string
	}{
		{"two lines", "a\nb"},
		{"two trailing newlines", "a\n\n"},
		{"carriage return inside", "a\rb"},
		{"too long", strings.Repeat("y", maxAppend+1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _ := do(t, srv.Client(), "POST", srv.URL+"/append", tt.body)
			assert.Equal(t, http.StatusBadRequest, code)
		})
	}
	code, _ := do(t, srv.Client(), "POST", srv.URL+"/append", strings.Repeat("z", maxAppend-1)+"\n")
	assert.Equal(t, http.StatusOK, code, "a body of exactly 64 KiB is fine")
	disk, err := os.ReadFile(logPath)
	require.NoError(t, err)
	assert.Equal(t, maxAppend, len(disk), "only the good line was written")
}

func TestMethodsAndPaths(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t, filepath.Join(t.TempDir(), "log.txt"))
	tests := []struct {
		method, path string
		want         int
		body         string
	}{
		{"GET", "/healthz", http.StatusOK, "ok\n"},
		{"GET", "/incr", http.StatusMethodNotAllowed, ""},
		{"PUT", "/append", http.StatusMethodNotAllowed, ""},
		{"POST", "/log", http.StatusMethodNotAllowed, ""},
		{"POST", "/healthz", http.StatusMethodNotAllowed, ""},
		{"GET", "/nope", http.StatusNotFound, ""},
	}
	for _, tt := range tests {
		t.Run(tt.method+tt.path, func(t *testing.T) {
			code, body := do(t, srv.Client(), tt.method, srv.URL+tt.path, "")
			assert.Equal(t, tt.want, code)
			if tt.body != "" {
				assert.Equal(t, tt.body, body)
			}
		})
	}
}

// A restarted service continues the line count of the file it finds, and
// terminates a torn last line first.
func TestLineCountAtStart(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, existing string
		wantN          string
		wantFile       string
	}{
		{"new file", "", "1\n", "new\n"},
		{"three lines", "a\nb\nc\n", "4\n", "a\nb\nc\nnew\n"},
		{"torn last line", "a\nb", "3\n", "a\nb\nnew\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logPath := filepath.Join(t.TempDir(), "log.txt")
			if tt.existing != "" {
				require.NoError(t, os.WriteFile(logPath, []byte(tt.existing), 0o644))
			}
			srv, _ := newTestServer(t, logPath)
			code, n := do(t, srv.Client(), "POST", srv.URL+"/append", "new")
			require.Equal(t, http.StatusOK, code)
			assert.Equal(t, tt.wantN, n)
			disk, err := os.ReadFile(logPath)
			require.NoError(t, err)
			assert.Equal(t, tt.wantFile, string(disk))
		})
	}
}

func TestOpenServiceError(t *testing.T) {
	t.Parallel()
	_, err := openService(filepath.Join(t.TempDir(), "no", "such", "dir", "log.txt"))
	assert.Error(t, err)
}

// A client that asks for the log and does not read the answer must not
// hold up appends (the log used to be sent under the appends' lock).
func TestSlowLogReaderDoesNotBlockAppends(t *testing.T) {
	t.Parallel()
	srv, _ := newTestServer(t, filepath.Join(t.TempDir(), "log.txt"))
	c := srv.Client()
	line := strings.Repeat("y", 60<<10)
	for range 256 { // 15 MiB of log: more than the sockets' buffers hold
		code, got := do(t, c, "POST", srv.URL+"/append", line)
		require.Equal(t, http.StatusOK, code, got)
	}
	slow, err := net.Dial("tcp", srv.Listener.Addr().String())
	require.NoError(t, err)
	defer slow.Close()
	_, err = io.WriteString(slow, "GET /log HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	// The handler is now blocked writing the log into a full socket; wait
	// until it has sent the first bytes, so it surely holds what it holds.
	var first [1]byte
	_, err = io.ReadFull(slow, first[:])
	require.NoError(t, err)
	done := make(chan string, 1)
	go func() { // not do: its require would end the test from this goroutine
		resp, err := c.Post(srv.URL+"/append", "text/plain", strings.NewReader("after"))
		if err != nil {
			done <- err.Error()
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			done <- err.Error()
			return
		}
		done <- fmt.Sprint(resp.StatusCode, " ", string(b))
	}()
	select {
	case got := <-done:
		assert.Equal(t, "200 257\n", got)
	case <-time.After(30 * time.Second):
		t.Fatal("POST /append waited for a GET /log that its client does not read")
	}
}
