package main

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"
)

// A boot's kernel and initramfs are mapped and faulted in whole; once the
// guest has its copy, drop gives their pages back (the process's RSS no
// longer counts them) and the bytes stay readable, faulted in again.
func TestMapFileDropKeepsTheBytes(t *testing.T) {
	const size = 4 << 20
	want := make([]byte, size)
	_, _ = rand.Read(want)
	path := filepath.Join(t.TempDir(), "initrd.img")
	require.NoError(t, os.WriteFile(path, want, 0o644))

	f, err := mapFile(path)
	require.NoError(t, err)
	defer f.close()
	require.True(t, f.mapped)
	require.Equal(t, size/1024, mappingRSSKiB(t, f.b), "faulted in whole when mapped")

	f.drop()
	require.Zero(t, mappingRSSKiB(t, f.b), "dropped: none of it resident in this process")
	require.Equal(t, want, f.b, "the bytes read back after the drop")

	empty := filepath.Join(t.TempDir(), "empty")
	require.NoError(t, os.WriteFile(empty, nil, 0o644))
	e, err := mapFile(empty)
	require.NoError(t, err)
	require.False(t, e.mapped, "an empty file is read, not mapped")
	e.drop() // nothing to give back
	e.close()
}

// mappingRSSKiB is the Rss that /proc/self/smaps gives for the mapping
// that starts at b.
func mappingRSSKiB(t *testing.T, b []byte) int {
	t.Helper()
	s, err := os.Open("/proc/self/smaps")
	require.NoError(t, err)
	defer s.Close()
	start := fmt.Sprintf("%x-", uintptr(unsafe.Pointer(&b[0])))
	in := false
	sc := bufio.NewScanner(s)
	for sc.Scan() {
		line := sc.Text()
		if fields := strings.Fields(line); len(fields) >= 5 && strings.Contains(fields[0], "-") {
			in = strings.HasPrefix(fields[0], start)
			continue
		}
		if in && strings.HasPrefix(line, "Rss:") {
			kb, err := strconv.Atoi(strings.Fields(line)[1])
			require.NoError(t, err)
			return kb
		}
	}
	require.NoError(t, sc.Err())
	t.Fatalf("no mapping at %s in /proc/self/smaps", start)
	return 0
}
