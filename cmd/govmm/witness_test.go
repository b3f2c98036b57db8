package main

import (
	"bufio"
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/replicate/witness"
)

// startWitnessCmd runs `govmm witness` and returns its address once it
// listens, and a stop function that SIGTERMs it and returns its status.
func startWitnessCmd(t *testing.T, keyFile, state string) (string, func() int) {
	t.Helper()
	cmd := exec.Command(govmmBin, "witness", "--listen", "127.0.0.1:0", "--key-file", keyFile, "--state", state)
	stderr, err := cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	lines := bufio.NewScanner(stderr)
	var addr string
	for lines.Scan() {
		if rest, ok := strings.CutPrefix(lines.Text(), "govmm: witness: listening on "); ok {
			addr, _, _ = strings.Cut(rest, " ")
			break
		}
	}
	require.NotEmpty(t, addr, "witness did not say where it listens")
	go func() {
		for lines.Scan() {
			t.Log("witness: " + lines.Text())
		}
	}()
	stopped := false
	stop := func() int {
		if stopped {
			return 0
		}
		stopped = true
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		err := cmd.Wait()
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		require.NoError(t, err)
		return 0
	}
	t.Cleanup(func() { stop() })
	return addr, stop
}

var quiet = slog.New(slog.DiscardHandler)

func writeKey(t *testing.T) (string, []byte) {
	key := []byte("0123456789abcdef0123456789abcdef")
	path := filepath.Join(t.TempDir(), "key")
	require.NoError(t, os.WriteFile(path, key, 0o600))
	return path, key
}

// govmm witness grants generations, keeps them across its restart, and
// lists them.
func TestWitnessCommand(t *testing.T) {
	keyFile, key := writeKey(t)
	state := filepath.Join(t.TempDir(), "state")
	addr, stop := startWitnessCmd(t, keyFile, state)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Requests get 2 s, not a 200 ms lease's default 50 ms (dial and
	// handshake included): this test is about what the witness keeps,
	// and a loaded host (the lab beside busy loops) took longer than 50 ms
	// for a fresh witness's first handshake.
	c, err := witness.NewClient(witness.Config{Addr: addr, Key: key, VM: "web", Holder: "primary test", Lease: 200 * time.Millisecond,
		RequestTimeout: 2 * time.Second, Logger: quiet})
	require.NoError(t, err)
	defer c.Close()
	l, err := c.Acquire(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(1), l.Generation())
	require.True(t, l.CanRelease())

	// A second witness on the same state is refused.
	_, errOut, status := govmm(t, 10*time.Second, "witness", "--listen", "127.0.0.1:0", "--key-file", keyFile, "--state", state)
	require.Equal(t, 1, status)
	require.Equal(t, 1, strings.Count(errOut, "\n"), errOut)
	require.Contains(t, errOut, "state directory in use by another witness")

	l.Close()
	require.Equal(t, 0, stop())
	out, errOut, status := govmm(t, 10*time.Second, "witness", "--state", state, "--list")
	require.Equal(t, 0, status, errOut)
	require.Regexp(t, `(?m)^web\s+1\s+primary test #[0-9a-f]{16}\s+200ms$`, out)

	// Restarted on another port, it still knows generation 1: a standby
	// claims generation 2 once the lease granted again at the restart
	// has run out.
	addr, _ = startWitnessCmd(t, keyFile, state)
	s, err := witness.NewClient(witness.Config{Addr: addr, Key: key, VM: "web", Holder: "standby test", Lease: 200 * time.Millisecond,
		RequestTimeout: 2 * time.Second, Logger: quiet})
	require.NoError(t, err)
	defer s.Close()
	rec, err := s.Query(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(1), rec.Generation)
	require.Equal(t, c.Holder(), rec.Holder)
	sl, err := s.Claim(ctx, 1)
	require.NoError(t, err)
	defer sl.Close()
	require.Equal(t, uint64(2), sl.Generation())
	_, err = s.Claim(ctx, 1)
	require.ErrorContains(t, err, "already holds generation 2")
	late, err := witness.NewClient(witness.Config{Addr: addr, Key: key, VM: "web", Holder: "late standby", Logger: quiet})
	require.NoError(t, err)
	defer late.Close()
	_, err = late.Claim(ctx, 1)
	require.ErrorIs(t, err, witness.ErrSuperseded)
}

// Bad input: one line saying what is wrong.
func TestWitnessCommandBadInput(t *testing.T) {
	keyFile, _ := writeKey(t)
	loose := filepath.Join(t.TempDir(), "loose")
	require.NoError(t, os.WriteFile(loose, []byte("0123456789abcdef0123"), 0o644))
	corrupt := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(corrupt, "witness.json"), []byte("{"), 0o600))
	state := t.TempDir()
	for _, tt := range []struct {
		args   []string
		status int
		want   string
	}{
		{[]string{"--listen", "127.0.0.1:0", "--key-file", keyFile}, 2, "--state DIR is required"},
		{[]string{"--state", state, "--key-file", keyFile}, 2, "--listen HOST:PORT is required"},
		{[]string{"--state", state, "--listen", "7000", "--key-file", keyFile}, 2, `--listen 7000: want HOST:PORT`},
		{[]string{"--state", state, "--listen", "127.0.0.1:0"}, 2, "--key-file is required"},
		{[]string{"--state", state, "--listen", "127.0.0.1:0", "--key-file", loose}, 1, "lets others read it (chmod 600)"},
		{[]string{"--state", corrupt, "--listen", "127.0.0.1:0", "--key-file", keyFile}, 1, "witness.json: not a witness state file"},
		{[]string{"--state", corrupt, "--list"}, 1, "witness.json: not a witness state file"},
		{[]string{"--state", state, "--listen", "127.0.0.1:0", "--key-file", keyFile, "--max-lease", "1h"}, 2, "--max-lease 1h: want 10ms to 10m0s"},
		{[]string{"--state", state, "stray"}, 2, `unexpected argument "stray"`},
	} {
		_, errOut, status := govmm(t, 10*time.Second, append([]string{"witness"}, tt.args...)...)
		require.Equal(t, tt.status, status, "%v: %s", tt.args, errOut)
		require.Equal(t, 1, strings.Count(errOut, "\n"), "%v: %s", tt.args, errOut)
		require.Contains(t, errOut, tt.want, tt.args)
	}
}
