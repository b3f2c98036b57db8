package lab

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// L1s share the host's CPUs: as many run at once as their vCPUs fit, the
// rest wait (and say so) until enough CPUs are free.
func TestLockCPUs(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	var log bytes.Buffer
	a, err := lockCPUs(ctx, dir, 1, 2, &log)
	require.NoError(t, err)
	b, err := lockCPUs(ctx, dir, 1, 2, &log)
	require.NoError(t, err, "two 1-vCPU L1s fit two CPUs")
	require.Empty(t, log.String(), "nobody waited")

	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	_, err = lockCPUs(short, dir, 1, 2, &log)
	require.ErrorIs(t, err, context.DeadlineExceeded, "a third waits")
	require.Contains(t, log.String(), "waiting for 1 of this host's 2 CPUs")

	// A 2-vCPU L1 waits for both CPUs, and takes none while it waits.
	got := make(chan func(), 1)
	go func() {
		u, err := lockCPUs(ctx, dir, 2, 2, &bytes.Buffer{})
		if err == nil {
			got <- u
		}
	}()
	a()
	select {
	case <-got:
		t.Fatal("took two CPUs while one was still held")
	case <-time.After(500 * time.Millisecond):
	}
	c, err := lockCPUs(ctx, dir, 1, 2, &log)
	require.NoError(t, err, "the waiting 2-vCPU L1 holds nothing: the freed CPU is free")
	c()
	b()
	select {
	case u := <-got:
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("the 2-vCPU L1 did not get both CPUs once they were free")
	}

	// More vCPUs than the host has CPUs: all of them.
	all, err := lockCPUs(ctx, dir, 8, 2, &log)
	require.NoError(t, err)
	short2, cancel2 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel2()
	_, err = lockCPUs(short2, dir, 1, 2, &log)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	all()
}

// L1 counts as wedged only once its heartbeat exists and stands still for
// longer than heartbeatLimit.
func TestWedged(t *testing.T) {
	hb := t.TempDir() + "/heartbeat"
	require.False(t, wedged(hb), "no heartbeat yet: the command has not started")
	require.NoError(t, os.WriteFile(hb, nil, 0o644))
	require.False(t, wedged(hb))
	old := time.Now().Add(-heartbeatLimit - time.Second)
	require.NoError(t, os.Chtimes(hb, old, old))
	require.True(t, wedged(hb))
}

// L1 counts as stuck at boot once the limit has passed without the
// command's start, never after it started; and as stuck when wedged.
func TestStuck(t *testing.T) {
	ctl := t.TempDir()
	assert.Empty(t, stuck(ctl, time.Minute, bootLimit), "booting, within bootLimit")
	assert.Contains(t, stuck(ctl, bootLimit+time.Second, bootLimit), "had not started 3m0s after QEMU did")
	assert.Contains(t, stuck(ctl, 2*time.Second, time.Second), "had not started 1s after QEMU did")
	require.NoError(t, os.WriteFile(filepath.Join(ctl, "started"), nil, 0o644))
	assert.Empty(t, stuck(ctl, time.Hour, bootLimit), "started: a long run is not a stuck boot")
	hb := filepath.Join(ctl, "heartbeat")
	require.NoError(t, os.WriteFile(hb, nil, 0o644))
	assert.Empty(t, stuck(ctl, time.Hour, bootLimit))
	old := time.Now().Add(-heartbeatLimit - time.Second)
	require.NoError(t, os.Chtimes(hb, old, old))
	assert.Equal(t, "no heartbeat for 2m0s, L1 wedged", stuck(ctl, time.Hour, bootLimit))
}
