package ctlapi

// The NDJSON streams of long operations: migrate's and replicate's
// progress lines, then their result.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMigrateProgressInOrder checks that every update arrives, in order,
// before the result.
func TestMigrateProgressInOrder(t *testing.T) {
	t.Parallel()
	const n = 200 // under queueCoalesce, so nothing may be coalesced
	_, c := serve(t, &fakeBackend{migrate: func(_ context.Context, _ string, progress func(Progress)) (MigrateResult, error) {
		for i := 1; i <= n; i++ {
			progress(Progress{Round: i, BytesSent: uint64(i) * 4096, RemainingPages: uint64(n - i), Phase: PhasePrecopy})
		}
		progress(Progress{Round: n + 1, Phase: PhaseDone})
		return MigrateResult{Rounds: n + 1}, nil
	}})
	var got []Progress
	res, err := c.Migrate(t.Context(), MigrateRequest{To: "a:1"}, func(p Progress) { got = append(got, p) })
	require.NoError(t, err)
	assert.Equal(t, n+1, res.Rounds)
	require.Len(t, got, n+1)
	for i, p := range got[:n] {
		assert.Equal(t, Progress{Round: i + 1, BytesSent: uint64(i+1) * 4096, RemainingPages: uint64(n - i - 1), Phase: PhasePrecopy}, p)
	}
	assert.Equal(t, PhaseDone, got[n].Phase)
}

// TestMigrateNDJSONWire pins the stream's lines as a non-Go client sees them.
func TestMigrateNDJSONWire(t *testing.T) {
	t.Parallel()
	s, _ := serve(t, &fakeBackend{})
	resp, body := rawDo(t, s.Path(), "PUT", "/vm/migrate", strings.NewReader(`{"to":"10.0.0.2:7000"}`))
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, NDJSONContentType, resp.Header.Get("Content-Type"))
	assert.Equal(t, `{"progress":{"round":1,"bytes_sent":0,"dirty_pages":0,"remaining_pages":10,"phase":"precopy"}}
{"progress":{"round":2,"bytes_sent":40960,"dirty_pages":0,"remaining_pages":0,"phase":"stop-and-copy"}}
{"progress":{"round":2,"bytes_sent":45056,"dirty_pages":0,"remaining_pages":0,"phase":"done"}}
{"result":{"total_time_ns":1000000000,"downtime_ns":20000000,"rounds":2,"bytes_sent":45056,"pages_sent":11}}
`, string(body))
}

// TestMigrateStreamCutShort checks the client's answer to a stream that
// ends without a result (the VMM died mid-migration).
func TestMigrateStreamCutShort(t *testing.T) {
	t.Parallel()
	path := sockPath(t)
	ln, err := net.Listen("unix", path)
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", NDJSONContentType)
		fmt.Fprintln(w, `{"progress":{"round":1,"phase":"precopy"}}`)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	n := 0
	_, err = NewClient(path).Migrate(t.Context(), MigrateRequest{To: "a:1"}, func(Progress) { n++ })
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.Equal(t, 1, n)
}

// replBackend is a fakeBackend that can replicate: start stands for the
// initial sync.
type replBackend struct {
	*fakeBackend
	start func(ctx context.Context, req ReplicateRequest, progress func(Progress)) error
}

func (r *replBackend) StartReplication(ctx context.Context, req ReplicateRequest, progress func(Progress)) error {
	return r.start(ctx, req, progress)
}

func (r *replBackend) StopReplication() error { return nil }

// PUT /vm/replicate streams the initial sync's progress like a migration,
// then its result, or its error with the status it would have had (a
// second replication is a conflict).
func TestReplicateNDJSON(t *testing.T) {
	t.Parallel()
	var busy bool
	s, c := serve(t, &replBackend{fakeBackend: &fakeBackend{}, start: func(_ context.Context, req ReplicateRequest, progress func(Progress)) error {
		if busy {
			return fmt.Errorf("replicate: %w: already replicating to %s", ErrConflict, req.To)
		}
		busy = true
		progress(Progress{Phase: PhaseSync, Round: 1, BytesSent: 4 << 20, TotalBytes: 8 << 20})
		progress(Progress{Phase: PhaseSyncAck, Round: 2, BytesSent: 9 << 20, TotalBytes: 8 << 20})
		return nil
	}})
	resp, body := rawDo(t, s.Path(), "PUT", "/vm/replicate", strings.NewReader(`{"to":"10.0.0.2:7000"}`))
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, NDJSONContentType, resp.Header.Get("Content-Type"))
	assert.Equal(t, `{"progress":{"round":1,"bytes_sent":4194304,"dirty_pages":0,"remaining_pages":0,"phase":"sync","total_bytes":8388608}}
{"progress":{"round":2,"bytes_sent":9437184,"dirty_pages":0,"remaining_pages":0,"phase":"sync-ack","total_bytes":8388608}}
{"result":{"to":"10.0.0.2:7000"}}
`, string(body))

	var got []Progress
	err := c.Replicate(t.Context(), ReplicateRequest{To: "10.0.0.3:7000"}, func(p Progress) { got = append(got, p) })
	var ae *APIError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, http.StatusConflict, ae.Status)
	assert.Equal(t, "replicate: conflict: already replicating to 10.0.0.3:7000", ae.Message)
	assert.Empty(t, got)
}
