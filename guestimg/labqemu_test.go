package guestimg

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A fetched QEMU is used only with its manifest (written last: a fetch
// that died half-way left none), for this suite and package set, and
// with its binary in place; it searches its own firmware first and loads
// its own modules.
func TestCachedLabQEMU(t *testing.T) {
	dir := t.TempDir()
	_, ok := cachedLabQEMU(dir)
	assert.False(t, ok, "no manifest")

	bin := filepath.Join(dir, "root", "usr", "bin", "qemu-system-x86_64")
	require.NoError(t, os.MkdirAll(filepath.Dir(bin), 0o755))
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755))
	write := func(m labQEMUManifest) {
		b, err := json.Marshal(m)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, manifestName), b, 0o644))
	}
	write(labQEMUManifest{Suite: "trixie", Packages: labQEMUPackages, Version: "10.0.2"})
	_, ok = cachedLabQEMU(dir)
	assert.False(t, ok, "another suite's")
	write(labQEMUManifest{Suite: LabQEMUSuite, Packages: labQEMUPackages[:1], Version: "10.0.2"})
	_, ok = cachedLabQEMU(dir)
	assert.False(t, ok, "another package set's")

	write(labQEMUManifest{Suite: LabQEMUSuite, Packages: labQEMUPackages, Version: "10.0.2 (Debian)"})
	e, ok := cachedLabQEMU(dir)
	require.True(t, ok)
	assert.Equal(t, bin, e.Binary)
	assert.Equal(t, "10.0.2 (Debian)", e.Version)
	assert.Equal(t, filepath.Join(dir, "root", "usr", "share", "qemu"), e.DataDirs[0], "its own firmware first")
	assert.Contains(t, e.DataDirs, "/usr/share/qemu", "then the system's (SeaBIOS)")
	assert.Equal(t, []string{"QEMU_MODULE_DIR=" + filepath.Join(dir, "root", "usr", "lib", "x86_64-linux-gnu", "qemu")}, e.Env)

	require.NoError(t, os.Remove(bin))
	_, ok = cachedLabQEMU(dir)
	assert.False(t, ok, "binary gone")
}

// A failed fetch is remembered for LabQEMURetryAfter, for the mirror it
// asked only; a file that does not parse, or a date in the future (a
// clock set back), remembers nothing.
func TestRecentLabQEMUFailure(t *testing.T) {
	file := filepath.Join(t.TempDir(), "qemu.failed")
	now := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	_, ok := recentLabQEMUFailure(file, labQEMUMirror, now)
	assert.False(t, ok, "no file")

	rememberLabQEMUFailure(file, labQEMUFailure{Mirror: labQEMUMirror, At: now.Add(-10 * time.Minute), Error: "connection refused"})
	f, ok := recentLabQEMUFailure(file, labQEMUMirror, now)
	require.True(t, ok)
	assert.Equal(t, "connection refused", f.Error)
	assert.True(t, f.At.Equal(now.Add(-10*time.Minute)))
	_, ok = recentLabQEMUFailure(file, "http://mirror.example/debian", now)
	assert.False(t, ok, "another mirror's failure")
	_, ok = recentLabQEMUFailure(file, labQEMUMirror, now.Add(LabQEMURetryAfter))
	assert.False(t, ok, "an hour and ten minutes on")
	_, ok = recentLabQEMUFailure(file, labQEMUMirror, now.Add(-time.Hour))
	assert.False(t, ok, "dated in the future")

	require.NoError(t, os.WriteFile(file, []byte("{not json"), 0o644))
	_, ok = recentLabQEMUFailure(file, labQEMUMirror, now)
	assert.False(t, ok, "a file that does not parse")
}
