package witness

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// The state directory holds stateFileName (the generations, JSON, written
// atomically) and lockFileName (flock'ed by the one witness using it).
const (
	stateFileName = "witness.json"
	lockFileName  = "lock"
	stateFormat   = "govmm-witness-state"
	stateVersion  = 1
	// MaxStateFile caps the state file read at start.
	MaxStateFile = 4 << 20
)

type stateJSON struct {
	Format  string    `json:"format"`
	Version int       `json:"version"`
	VMs     []stateVM `json:"vms"`
}

type stateVM struct {
	VM         string `json:"vm"`
	Generation uint64 `json:"generation"`
	Holder     string `json:"holder"`
	LeaseMS    int64  `json:"lease_ms"`
}

func encodeState(recs []durable) []byte {
	s := stateJSON{Format: stateFormat, Version: stateVersion, VMs: make([]stateVM, 0, len(recs))}
	for _, d := range recs {
		s.VMs = append(s.VMs, stateVM{VM: d.VM, Generation: d.Generation, Holder: d.Holder, LeaseMS: d.Lease.Milliseconds()})
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		panic("witness: encode state: " + err.Error()) // plain structs of strings and integers
	}
	return append(b, '\n')
}

// decodeState parses a state file, refusing anything it would not have
// written: unknown fields, another format or version, empty or duplicate
// names, generation 0, leases out of range.
func decodeState(b []byte) ([]durable, error) {
	if len(b) > MaxStateFile {
		return nil, fmt.Errorf("%d bytes, at most %d", len(b), MaxStateFile)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var s stateJSON
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("not a witness state file: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("trailing data after the state")
	}
	if s.Format != stateFormat {
		return nil, fmt.Errorf("format %q, want %q", s.Format, stateFormat)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("version %d, this witness reads %d", s.Version, stateVersion)
	}
	seen := make(map[string]bool, len(s.VMs))
	out := make([]durable, 0, len(s.VMs))
	for i, v := range s.VMs {
		if err := checkName("vm name", v.VM); err != nil {
			return nil, fmt.Errorf("entry %d: %w", i, err)
		}
		if err := checkName("holder", v.Holder); err != nil {
			return nil, fmt.Errorf("entry %d (%s): %w", i, v.VM, err)
		}
		if seen[v.VM] {
			return nil, fmt.Errorf("entry %d: vm %q appears twice", i, v.VM)
		}
		seen[v.VM] = true
		if v.Generation == 0 {
			return nil, fmt.Errorf("entry %d (%s): generation 0", i, v.VM)
		}
		l := time.Duration(v.LeaseMS) * time.Millisecond
		if v.LeaseMS <= 0 || l < MinLease || l > maxLeaseCap {
			return nil, fmt.Errorf("entry %d (%s): lease %dms outside [%v, %v]", i, v.VM, v.LeaseMS, MinLease, maxLeaseCap)
		}
		out = append(out, durable{VM: v.VM, Generation: v.Generation, Holder: v.Holder, Lease: l})
	}
	return out, nil
}

// store is the witness's state directory, locked for one witness.
type store struct {
	dir  string
	lock *os.File
}

// ErrStateInUse is returned when another witness holds the state
// directory: two witnesses sharing one state would each grant generations.
var ErrStateInUse = errors.New("state directory in use by another witness")

func openStore(dir string) (*store, []durable, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("state directory: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(dir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("state directory: %w", err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, nil, fmt.Errorf("%s: %w", dir, ErrStateInUse)
		}
		return nil, nil, fmt.Errorf("state directory %s: lock: %w", dir, err)
	}
	_ = os.Remove(filepath.Join(dir, stateFileName+".tmp")) // a save that never completed
	recs, err := readState(dir)
	if err != nil {
		lf.Close()
		return nil, nil, err
	}
	return &store{dir: dir, lock: lf}, recs, nil
}

// ReadState reads the generations saved in a witness state directory
// (none if it has no state file yet), for `govmm witness --list`. It
// takes no lock: saves replace the file atomically. Leases are not saved:
// Remaining and Renewals are zero.
func ReadState(dir string) ([]Record, error) {
	recs, err := readState(dir)
	if err != nil {
		return nil, err
	}
	out := make([]Record, len(recs))
	for i, d := range recs {
		out[i] = Record{VM: d.VM, Generation: d.Generation, Holder: d.Holder, Lease: d.Lease}
	}
	return out, nil
}

func readState(dir string) ([]durable, error) {
	path := filepath.Join(dir, stateFileName)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("state file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxStateFile+1))
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	recs, err := decodeState(b)
	if err != nil {
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	return recs, nil
}

// save replaces the state file atomically and durably: write a temporary
// file, fsync it, rename it over the old one, fsync the directory. A crash
// at any point leaves either the old state or the new one.
func (s *store) save(recs []durable) error {
	tmp := filepath.Join(s.dir, stateFileName+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	_, werr := f.Write(encodeState(recs))
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("save state: %w", werr)
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, stateFileName)); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("save state: %w", err)
	}
	d, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("save state: %w: %w", errSaveUncertain, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("save state: fsync %s: %w: %w", s.dir, errSaveUncertain, err)
	}
	return nil
}

// errSaveUncertain: the new state file was renamed into place but the
// directory was not synced: after a crash the witness may come back with
// either state. Nothing is granted, and the witness stops (table.broken):
// only a restart, which reads the disk, knows which state holds.
var errSaveUncertain = errors.New("state may or may not have been saved")

func (s *store) close() {
	if s.lock != nil {
		s.lock.Close() // releases the flock
		s.lock = nil
	}
}
