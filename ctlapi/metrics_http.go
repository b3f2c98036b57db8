package ctlapi

import (
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// MetricsServer serves GET /metrics over TCP, for Prometheus to scrape:
// the control API's unix socket is for the operator on the VMM's host.
type MetricsServer struct {
	ln     net.Listener
	http   *http.Server
	served chan struct{} // closed when http.Serve has returned

	closeOnce sync.Once
	closeErr  error
}

// CheckMetricsAddr refuses an address that is not HOST:PORT with a port
// number (HOST may be empty: every interface).
func CheckMetricsAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not HOST:PORT (e.g. 127.0.0.1:9100)", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || (n == 0 && port != "0") {
		return fmt.Errorf("%q: port %q is not a number from 0 to 65535", addr, port)
	}
	return nil
}

// ServeMetrics listens on addr (HOST:PORT; port 0 picks a free one) and
// serves stats' samples at GET /metrics in the text exposition format,
// sorted as the control API's /metrics is, until Close. Any other path is
// 404 and another method 405. stats is called once per scrape, from the
// connection's goroutine, so it must be safe for concurrent use.
func ServeMetrics(addr string, stats func() Stats) (*MetricsServer, error) {
	if err := CheckMetricsAddr(addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &MetricsServer{ln: ln, served: make(chan struct{})}
	s.http = &http.Server{
		Handler:           MetricsHandler(stats),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(slog.Default().Handler(), slog.LevelWarn),
	}
	go func() {
		defer close(s.served)
		_ = s.http.Serve(ln) // ErrServerClosed after Close
	}()
	return s, nil
}

// Addr is the address the server listens on (with the port chosen).
func (s *MetricsServer) Addr() string { return s.ln.Addr().String() }

// Close stops serving and waits for the server's goroutine. It is
// idempotent.
func (s *MetricsServer) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.http.Close()
		<-s.served
	})
	return s.closeErr
}

// MetricsHandler answers GET (and HEAD) /metrics with stats' samples in
// the text exposition format.
func MetricsHandler(stats func() Stats) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path != "/metrics":
			writeError(w, fmt.Errorf("%w: %s %s (only /metrics here)", ErrNotFound, r.Method, r.URL.Path))
		case r.Method != http.MethodGet && r.Method != http.MethodHead:
			w.Header().Set("Allow", "GET, HEAD")
			writeError(w, fmt.Errorf("%w: %s %s (use GET)", ErrNotAllowed, r.Method, r.URL.Path))
		default:
			writeMetrics(w, stats())
		}
	})
}

// writeMetrics writes st as the text exposition format, or a 500 that
// says why it cannot be encoded.
func writeMetrics(w http.ResponseWriter, st Stats) {
	text, err := EncodePrometheus(st)
	if err != nil {
		writeError(w, fmt.Errorf("metrics: %w", err))
		return
	}
	w.Header().Set("Content-Type", PrometheusContentType)
	_, _ = w.Write(text)
}
