package ctlapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// Backend is what a running VMM offers the API; govmm run implements it.
// Its methods may be called concurrently from several requests. A method
// that refuses because of the VM's state (pausing a paused VM) wraps
// ErrConflict; one that refuses its arguments wraps ErrInvalid; one the VMM
// cannot do yet wraps ErrNotSupported. Any other error is a 500.
type Backend interface {
	// Info describes the VM now.
	Info() Info
	// Pause stops every vCPU.
	Pause() error
	// Resume restarts them.
	Resume() error
	// Snapshot writes the machine state and memory to path (absolute, on
	// the VMM's host). It returns early with ctx's error when ctx is done.
	Snapshot(ctx context.Context, path string) (SnapshotResult, error)
	// Migrate live-migrates the VM to the standby at req.To (host:port),
	// calling progress as it goes. progress never blocks and may be called
	// from any goroutine, but not after Migrate returns.
	Migrate(ctx context.Context, req MigrateRequest, progress func(Progress)) (MigrateResult, error)
	// Stats returns the counters and gauges served at /stats and /metrics.
	Stats() Stats
}

// Info describes a VM. Durations travel as integer nanoseconds, named so.
type Info struct {
	Name        string        `json:"name"`
	State       string        `json:"state"` // "running", "paused", ...
	VCPUs       int           `json:"vcpus"`
	MemoryBytes uint64        `json:"memory_bytes"`
	Devices     []string      `json:"devices"`
	Uptime      time.Duration `json:"uptime_ns"`
	Role        string        `json:"replication_role"` // "", "primary", "standby"
	Peer        string        `json:"replication_peer"` // host:port or ""
	// Fencing is the VMM's standing at the witness in words (its
	// generation and lease, or FENCED; "" without a witness), or, on a
	// standing-by standby, whether a failover would be possible now and
	// why not.
	Fencing string `json:"fencing,omitempty"`
	// Standby is what a standby receives, while no guest runs there (nil
	// elsewhere).
	Standby *StandbyInfo `json:"standby,omitempty"`
}

// StandbyInfo is what a standby receives from its source.
type StandbyInfo struct {
	Phase  string `json:"phase"`            // listening, replicating, claiming, running
	Source string `json:"source,omitempty"` // the source's VM name (and holder at the witness)
	// Checkpoint is the last checkpoint committed here (0: none yet), Lag
	// the time since it committed while a source is followed.
	Checkpoint    uint64        `json:"checkpoint"`
	Lag           time.Duration `json:"lag_ns"`
	BytesReceived uint64        `json:"bytes_received"` // from every source, stream bytes
	Witness       string        `json:"witness"`        // its address, "" without one
}

// SnapshotResult reports what a snapshot wrote.
type SnapshotResult struct {
	Path      string        `json:"path"`
	Bytes     uint64        `json:"bytes"`      // written to the file
	Pages     uint64        `json:"pages"`      // guest pages saved
	ZeroPages uint64        `json:"zero_pages"` // of those, elided as all-zero
	Pause     time.Duration `json:"pause_ns"`   // how long the vCPUs were stopped
}

// Migration phases in Progress.Phase.
const (
	PhasePrecopy     = "precopy"
	PhaseStopAndCopy = "stop-and-copy"
	PhaseDone        = "done"
	// PhaseSync is the initial sync of replication (PUT /vm/replicate):
	// its progress has BytesSent, TotalBytes and Round.
	PhaseSync = "sync"
	// PhaseSyncAck ends an initial sync: everything is sent, the
	// standby's ack of the first checkpoint is awaited.
	PhaseSyncAck = "sync-ack"
)

// Progress is one update of a live migration or of replication's initial
// sync.
type Progress struct {
	Round          int    `json:"round"`
	BytesSent      uint64 `json:"bytes_sent"`      // so far, all rounds
	DirtyPages     uint64 `json:"dirty_pages"`     // dirtied during the last round
	RemainingPages uint64 `json:"remaining_pages"` // still to send in this round
	Phase          string `json:"phase"`           // PhasePrecopy, PhaseStopAndCopy, PhaseDone, PhaseSync, PhaseSyncAck
	// TotalBytes (PhaseSync) is the first full copy: every disk and all of
	// memory; BytesSent passes it in the rounds after the first.
	TotalBytes uint64 `json:"total_bytes,omitempty"`
}

// MigrateRequest is the body of PUT /vm/migrate.
type MigrateRequest struct {
	To string `json:"to"` // the destination standby, host:port
	// Force migrates a VM that is replicated: its replication stops first
	// and the guest runs UNPROTECTED at the destination. Without it the
	// backend refuses such a VM (ErrConflict).
	Force bool `json:"force,omitempty"`
}

// MigrateResult reports a finished live migration.
type MigrateResult struct {
	TotalTime time.Duration `json:"total_time_ns"`
	Downtime  time.Duration `json:"downtime_ns"`
	Rounds    int           `json:"rounds"`
	BytesSent uint64        `json:"bytes_sent"`
	PagesSent uint64        `json:"pages_sent"`
	// DroppedProtection is the standby whose protection a forced
	// migration ended ("" if the VM was not replicated): the guest runs
	// unprotected at the destination.
	DroppedProtection string `json:"dropped_protection,omitempty"`
}

// Stats is a set of metrics, and figures derived from them.
type Stats struct {
	Metrics []Metric `json:"metrics"`
	// Derived are figures computed from several metrics (a ratio, an
	// average) for a person: GET /stats serves them beside the metrics,
	// /metrics leaves them out (Prometheus derives its own).
	Derived []Derived `json:"derived,omitempty"`
}

// Derived is one figure computed from metrics, in a base unit: Unit is
// "bytes", "ratio" (one quantity over another, e.g. 0.3 for 0.3×),
// "fraction" (a part of a whole, 0 to 1) or "" for a plain number.
type Derived struct {
	Name  string  `json:"name"` // words, e.g. "wire bytes per dirty page"
	Help  string  `json:"help,omitempty"`
	Unit  string  `json:"unit,omitempty"`
	Value float64 `json:"value"`
}

// Metric is one sample. Name follows Prometheus' rules
// ([a-zA-Z_:][a-zA-Z0-9_:]*) and Type is one of counter, gauge, summary,
// histogram or untyped ("" means untyped). Samples of one family share Name,
// Help and Type and differ in Labels; for a summary or histogram, the
// samples named Name_sum, Name_count (and Name_bucket) belong to family Name
// and carry its Type too.
type Metric struct {
	Name   string
	Help   string
	Type   string
	Labels map[string]string
	Value  float64
}

// metricJSON is Metric on the wire. JSON has no NaN or infinities, so
// Value travels as a number when finite and as "NaN", "+Inf" or "-Inf"
// otherwise (as in the Prometheus text format).
type metricJSON struct {
	Name   string            `json:"name"`
	Help   string            `json:"help,omitempty"`
	Type   string            `json:"type,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	Value  json.RawMessage   `json:"value"`
}

// MarshalJSON implements json.Marshaler.
func (m Metric) MarshalJSON() ([]byte, error) {
	v := json.RawMessage(strconv.Quote(formatValue(m.Value)))
	if !math.IsNaN(m.Value) && !math.IsInf(m.Value, 0) {
		v = json.RawMessage(strconv.FormatFloat(m.Value, 'g', -1, 64))
	}
	return json.Marshal(metricJSON{m.Name, m.Help, m.Type, m.Labels, v})
}

// UnmarshalJSON implements json.Unmarshaler.
func (m *Metric) UnmarshalJSON(b []byte) error {
	var j metricJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	var v float64
	if err := json.Unmarshal(j.Value, &v); err != nil {
		var s string
		if json.Unmarshal(j.Value, &s) != nil {
			return fmt.Errorf("metric %q: value %s is neither a number nor a string", j.Name, j.Value)
		}
		if v, err = strconv.ParseFloat(s, 64); err != nil {
			return fmt.Errorf("metric %q: value: %w", j.Name, err)
		}
	}
	*m = Metric{Name: j.Name, Help: j.Help, Type: j.Type, Labels: j.Labels, Value: v}
	return nil
}

// Errors that a Backend wraps to choose the HTTP status, and that the
// Client's errors unwrap to, so errors.Is works on both sides.
var (
	ErrConflict     = errors.New("conflict")               // 409: the VM's state forbids it now
	ErrInvalid      = errors.New("invalid request")        // 400: bad request body or argument
	ErrNotFound     = errors.New("no such route")          // 404
	ErrNotAllowed   = errors.New("method not allowed")     // 405: wrong method for the route
	ErrTooLarge     = errors.New("request body too large") // 413: body over MaxBodyBytes
	ErrNotSupported = errors.New("not supported")          // 501: the backend cannot do it
	ErrInternal     = errors.New("internal error")         // 500: anything else
)

// ErrNoServer is wrapped by the Client's errors when nothing listens on
// the socket (no such file, or connection refused).
var ErrNoServer = errors.New("no VM listening")

// ErrInUse is wrapped by Serve's error when a live server already listens
// on the socket.
var ErrInUse = errors.New("socket in use")

// MaxBodyBytes caps a request body.
const MaxBodyBytes = 1 << 20

// statusOf maps an error to the HTTP status that reports it.
func statusOf(err error) int {
	switch {
	case errors.Is(err, ErrConflict):
		return http.StatusConflict
	case errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrNotAllowed):
		return http.StatusMethodNotAllowed
	case errors.Is(err, ErrTooLarge):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, ErrNotSupported):
		return http.StatusNotImplemented
	}
	return http.StatusInternalServerError
}

// sentinelOf is statusOf's inverse, for the client.
func sentinelOf(status int) error {
	switch status {
	case http.StatusConflict:
		return ErrConflict
	case http.StatusBadRequest:
		return ErrInvalid
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusMethodNotAllowed:
		return ErrNotAllowed
	case http.StatusRequestEntityTooLarge:
		return ErrTooLarge
	case http.StatusNotImplemented:
		return ErrNotSupported
	}
	return ErrInternal
}

// APIError is an error that the server reported. It unwraps to the
// sentinel for its status (ErrConflict for 409, ...).
type APIError struct {
	Status  int    // HTTP status
	Message string // the server's "error" text
}

func (e *APIError) Error() string { return e.Message }

// Unwrap returns the sentinel for e.Status.
func (e *APIError) Unwrap() error { return sentinelOf(e.Status) }

// DefaultSocketPath is where a client looks for the API when no path is
// given: $GOVMM_API_SOCK if set, else SocketPathFor("govmm") (the socket
// of a VM of the default name).
func DefaultSocketPath() string {
	if p := os.Getenv("GOVMM_API_SOCK"); p != "" {
		return p
	}
	return SocketPathFor("govmm")
}

// SocketPathFor is where the VMM of the VM name serves the API when given
// no path: $GOVMM_API_SOCK if set; else /run/govmm/NAME.sock for root;
// else $XDG_RUNTIME_DIR/govmm/NAME.sock if that is set (a per-user,
// private directory); else /run/govmm/NAME.sock.
func SocketPathFor(name string) string {
	if p := os.Getenv("GOVMM_API_SOCK"); p != "" {
		return p
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" && os.Geteuid() != 0 {
		return filepath.Join(d, "govmm", name+".sock")
	}
	return filepath.Join("/run/govmm", name+".sock")
}

// ReplicateResult ends PUT /vm/replicate's stream: the guest is protected.
type ReplicateResult struct {
	To string `json:"to"` // the standby
}

// ReplicateRequest is the body of PUT /vm/replicate.
type ReplicateRequest struct {
	To    string `json:"to"`              // the standby, host:port
	Epoch string `json:"epoch,omitempty"` // checkpoint interval, e.g. "25ms"
	// EpochMax turns on adaptive epochs up to this length, e.g. "200ms"
	// ("0": fixed epochs; default: the VM's --epoch-max).
	EpochMax string `json:"epoch_max,omitempty"`
}

// ReplicationBackend is implemented by backends that can start and stop
// replication on a running VM (PUT /vm/replicate, PUT /vm/replicate/stop).
type ReplicationBackend interface {
	// StartReplication returns once the guest is protected (after the
	// initial sync), or with the reason it is not, calling progress
	// (PhaseSync) as the initial sync goes; progress never blocks.
	StartReplication(ctx context.Context, req ReplicateRequest, progress func(Progress)) error
	// StopReplication ends it; the standby discards its replica.
	StopReplication() error
}
