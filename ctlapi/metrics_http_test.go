package ctlapi

import (
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/promcheck"
)

// ServeMetrics answers a scrape over a real TCP socket with the same page
// as the control API's /metrics, asks for the stats once per scrape, and
// serves nothing but GET /metrics; Close frees the port.
func TestServeMetricsTCP(t *testing.T) {
	t.Parallel()
	var scrapes atomic.Int64
	s, err := ServeMetrics("127.0.0.1:0", func() Stats { scrapes.Add(1); return promStats })
	require.NoError(t, err)
	defer s.Close()

	get := func(method, path string) (*http.Response, string) {
		req, err := http.NewRequestWithContext(t.Context(), method, "http://"+s.Addr()+path, nil)
		require.NoError(t, err)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, string(b)
	}
	resp, body := get("GET", "/metrics")
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, PrometheusContentType, resp.Header.Get("Content-Type"))
	assert.Equal(t, promGolden, body)
	_, err = promcheck.Parse(body)
	require.NoError(t, err)
	assert.Equal(t, int64(1), scrapes.Load())

	resp, _ = get("GET", "/vm")
	assert.Equal(t, 404, resp.StatusCode, "the control API is not served over TCP")
	resp, _ = get("POST", "/metrics")
	assert.Equal(t, 405, resp.StatusCode)
	assert.Equal(t, "GET, HEAD", resp.Header.Get("Allow"))

	addr := s.Addr()
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "idempotent")
	ln, err := net.Listen("tcp", addr)
	require.NoError(t, err, "Close freed the port")
	ln.Close()
}

func TestServeMetricsRefusesBadAddress(t *testing.T) {
	t.Parallel()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	tests := []struct{ addr, wantErr string }{
		{"9100", `"9100" is not HOST:PORT`},
		{"localhost", "is not HOST:PORT"},
		{"127.0.0.1:http", `port "http" is not a number`},
		{"127.0.0.1:70000", "is not a number from 0 to 65535"},
		{"127.0.0.1:", `port "" is not a number`},
		{busy.Addr().String(), "address already in use"},
	}
	for _, tt := range tests {
		_, err := ServeMetrics(tt.addr, func() Stats { return Stats{} })
		require.ErrorContains(t, err, tt.wantErr, tt.addr)
	}
}
