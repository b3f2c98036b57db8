package witness

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestWitnessRestartKeepsGenerations(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	pl, err := h.client(h.addr, "primary").Acquire(ctxT(t))
	require.NoError(t, err)
	pl.Close()
	clk.Advance(time.Second)
	sc := h.client(h.addr, "standby")
	sl, err := sc.Claim(ctxT(t), 1)
	require.NoError(t, err)
	sl.Close()

	h.restart()
	rec := h.record("vm0")
	require.Equal(t, uint64(2), rec.Generation)
	require.Equal(t, sc.Holder(), rec.Holder)
	require.Equal(t, time.Second, rec.Remaining, "after a restart every lease counts as just renewed")
	saved, err := ReadState(h.dir)
	require.NoError(t, err)
	require.Equal(t, []Record{{VM: "vm0", Generation: 2, Holder: sc.Holder(), Lease: time.Second}}, saved)

	// The old primary's generation stays superseded; a claim from 2 must
	// wait a whole lease after the restart.
	_, err = h.client(h.addr, "primary again").Claim(ctxT(t), 1)
	require.ErrorIs(t, err, ErrSuperseded)
	ctx, cancel := context.WithCancel(ctxT(t))
	done := make(chan error, 1)
	go func() {
		_, err := h.client(h.addr, "third").Claim(ctx, 2)
		done <- err
	}()
	clk.BlockUntil(t, 1)
	cancel()
	require.ErrorIs(t, <-done, ErrHeld)
	clk.Advance(time.Second)
	l3, err := h.client(h.addr, "third").Claim(ctxT(t), 2)
	require.NoError(t, err)
	l3.Close()
	require.Equal(t, uint64(3), l3.Generation())
}

func TestStateDirectory(t *testing.T) {
	clk := newFakeClock()
	h := startWitness(t, clk)
	_, err := NewServer(ServerConfig{Key: testKey, StateDir: h.dir, Clock: clk})
	require.ErrorIs(t, err, ErrStateInUse, "two witnesses on one state would both grant generations")

	h.stop()
	path := filepath.Join(h.dir, stateFileName)
	for name, content := range map[string]string{
		"garbage":         "not json",
		"other version":   `{"format":"govmm-witness-state","version":9,"vms":[]}`,
		"generation zero": `{"format":"govmm-witness-state","version":1,"vms":[{"vm":"a","generation":0,"holder":"h","lease_ms":1000}]}`,
		"duplicate":       `{"format":"govmm-witness-state","version":1,"vms":[{"vm":"a","generation":1,"holder":"h","lease_ms":1000},{"vm":"a","generation":2,"holder":"h","lease_ms":1000}]}`,
	} {
		require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
		_, err := NewServer(ServerConfig{Key: testKey, StateDir: h.dir, Clock: clk})
		require.Error(t, err, name)
		require.Contains(t, err.Error(), "witness.json", name)
		t.Logf("%s: %v", name, err)
	}
}

func TestSaveIsAtomic(t *testing.T) {
	dir := t.TempDir()
	st, recs, err := openStore(dir)
	require.NoError(t, err)
	defer st.close()
	require.Empty(t, recs)
	want := []durable{{VM: "a", Generation: 3, Holder: "h #1", Lease: time.Second}}
	require.NoError(t, st.save(want))
	got, err := readState(dir)
	require.NoError(t, err)
	require.Equal(t, want, got)
	_, err = os.Stat(filepath.Join(dir, stateFileName+".tmp"))
	require.ErrorIs(t, err, os.ErrNotExist)
	fi, err := os.Stat(filepath.Join(dir, stateFileName))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// A save that cannot write leaves the old state.
	require.NoError(t, os.Chmod(dir, 0o500))
	defer os.Chmod(dir, 0o700)
	if os.Geteuid() != 0 { // root writes anyway
		require.Error(t, st.save([]durable{{VM: "a", Generation: 4, Holder: "h", Lease: time.Second}}))
		got, err = readState(dir)
		require.NoError(t, err)
		require.Equal(t, want, got)
	}
}
