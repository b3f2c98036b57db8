package demo

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
)

// maxAppend is the largest body POST /append accepts.
const maxAppend = 64 << 10

// service is the demo's state: a counter in memory and a log file on disk.
// Every acknowledged append is on disk (fsync) before the reply is sent, so a
// client that saw "N" can rely on line N surviving a failover.
type service struct {
	counter atomic.Int64

	mu    sync.Mutex // guards log, lines; serializes appends
	log   *os.File   // opened O_APPEND
	lines int64
}

// openService opens (creating) the log file and counts its lines. A last
// line without its newline, left by a crash before fsync, is terminated so
// the next append starts a line of its own.
func openService(logPath string) (*service, error) {
	f, err := os.OpenFile(logPath, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("read log: %w", err)
	}
	s := &service{log: f, lines: int64(bytes.Count(data, []byte{'\n'}))}
	if len(data) > 0 && data[len(data)-1] != '\n' {
		if _, err := f.Write([]byte{'\n'}); err != nil {
			f.Close()
			return nil, fmt.Errorf("terminate last log line: %w", err)
		}
		s.lines++
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, fmt.Errorf("sync log: %w", err)
	}
	// Make the file's directory entry durable too.
	if d, err := os.Open(filepath.Dir(logPath)); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return s, nil
}

// Close closes the log file.
func (s *service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.Close()
}

// handler routes the demo's endpoints. A wrong method gets 405 with an
// Allow header (from http.ServeMux); an unknown path 404.
func (s *service) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /incr", s.incr)
	mux.HandleFunc("POST /append", s.appendLine)
	mux.HandleFunc("GET /log", s.getLog)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		text(w, http.StatusOK, "ok\n")
	})
	return mux
}

func (s *service) incr(w http.ResponseWriter, r *http.Request) {
	text(w, http.StatusOK, strconv.FormatInt(s.counter.Add(1), 10)+"\n")
}

// errBadLine is the reason an append body is refused.
var errBadLine = errors.New("body must be one line of at most 64 KiB")

// checkLine strips one trailing newline ("\n" or "\r\n") and refuses
// bodies that still hold a line break or are too long.
func checkLine(body []byte) ([]byte, error) {
	if len(body) > maxAppend {
		return nil, errBadLine
	}
	body = bytes.TrimSuffix(body, []byte{'\n'})
	body = bytes.TrimSuffix(body, []byte{'\r'})
	if bytes.ContainsAny(body, "\r\n") {
		return nil, errBadLine
	}
	return body, nil
}

func (s *service) appendLine(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxAppend+1))
	if err != nil {
		text(w, http.StatusBadRequest, "read body: "+err.Error()+"\n")
		return
	}
	line, err := checkLine(body)
	if err != nil {
		text(w, http.StatusBadRequest, err.Error()+"\n")
		return
	}
	n, err := s.appendAndSync(line)
	if err != nil {
		text(w, http.StatusInternalServerError, err.Error()+"\n")
		return
	}
	text(w, http.StatusOK, strconv.FormatInt(n, 10)+"\n")
}

// appendAndSync writes line and a newline in one write, fsyncs, and returns
// the new number of lines. Nothing is counted unless it is on disk.
func (s *service) appendAndSync(line []byte) (int64, error) {
	buf := make([]byte, 0, len(line)+1)
	buf = append(append(buf, line...), '\n')
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.log.Write(buf); err != nil {
		return 0, fmt.Errorf("append: %w", err)
	}
	if err := s.log.Sync(); err != nil {
		return 0, fmt.Errorf("fsync: %w", err)
	}
	s.lines++
	return s.lines, nil
}

// getLog sends the log as it stands once no append is under way. The
// lock covers the read only: sending can take seconds (a slow client, or
// a replicated guest whose output waits for each checkpoint's ack), and
// held across it, it kept every append waiting for the whole log to go out.
func (s *service) getLog(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	data, err := os.ReadFile(s.log.Name())
	s.mu.Unlock()
	if err != nil {
		text(w, http.StatusInternalServerError, "read log: "+err.Error()+"\n")
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(data)
}

func text(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(code)
	_, _ = io.WriteString(w, body)
}
