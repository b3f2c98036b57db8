package democlient

import (
	"context"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHistoryCheck(t *testing.T) {
	tests := []struct {
		name    string
		h       History
		log     []string
		wantErr bool
	}{
		{"empty", History{}, nil, false},
		{"good", History{Counter: []int{4, 5, 6}, Lines: []string{"a", "b"}, LineNo: []int{3, 4}}, []string{"x", "y", "a", "b", "c"}, false},
		{"repeated value", History{Counter: []int{4, 5, 5}}, nil, true},
		{"value went back", History{Counter: []int{4, 5, 3}}, nil, true},
		{"lost line", History{Lines: []string{"a", "b"}, LineNo: []int{1, 2}}, []string{"a"}, true},
		{"line replaced", History{Lines: []string{"a", "b"}, LineNo: []int{1, 2}}, []string{"a", "z"}, true},
		{"line count skipped", History{Lines: []string{"a", "b"}, LineNo: []int{1, 3}}, []string{"a", "q", "b"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.h.Check(tt.log)
			if tt.wantErr {
				assert.ErrorIs(t, err, ErrHistory)
			} else {
				assert.NoError(t, err)
			}
		})
	}
}

// A stand-in for the guest's demo service on loopback: the client uses one
// connection for everything, and its history checks out.
func TestClientOneConnection(t *testing.T) {
	var mu sync.Mutex
	counter, lines := 0, []string(nil)
	conns := map[string]bool{}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		conns[r.RemoteAddr] = true
		switch r.URL.Path {
		case "/incr":
			counter++
			w.Write([]byte(strconv.Itoa(counter) + "\n"))
		case "/append":
			b := make([]byte, r.ContentLength)
			_, _ = r.Body.Read(b)
			lines = append(lines, string(b))
			w.Write([]byte(strconv.Itoa(len(lines)) + "\n"))
		case "/log":
			w.Write([]byte(strings.Join(lines, "\n") + "\n"))
		}
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	c, err := Dial(context.Background(), ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	for i := 0; i < 5; i++ {
		_, err := c.Incr()
		require.NoError(t, err)
		_, err = c.Append("line " + strconv.Itoa(i))
		require.NoError(t, err)
	}
	log, err := c.Log()
	require.NoError(t, err)
	require.NoError(t, c.History().Check(log))
	assert.Equal(t, []int{1, 2, 3, 4, 5}, c.History().Counter)
	mu.Lock()
	assert.Len(t, conns, 1, "every request on one connection")
	mu.Unlock()
}
