package guestimg

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCPIOWriterRoundTrip(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	w := newCPIOWriter(&buf)
	require.NoError(t, w.Dir("bin", 0o755))
	require.NoError(t, w.File("bin/busybox", 0o755, []byte("hello")))
	require.NoError(t, w.Symlink("bin/sh", "busybox"))
	require.NoError(t, w.CharDev("dev/console", 0o600, 5, 1))
	require.NoError(t, w.File("empty", 0o644, nil))
	require.NoError(t, w.Close())
	require.NoError(t, w.Close(), "Close is idempotent")
	require.ErrorIs(t, w.File("late", 0o644, nil), errCPIOClosed)

	b := buf.Bytes()
	assert.Zero(t, len(b)%4, "archive length is a multiple of 4")
	assert.Contains(t, string(b), cpioTrailer)
	// The header layout itself: magic, then the file's inode, mode ...
	assert.Equal(t, "070701"+"00000001"+"000041ed", string(b[:22]))

	ents, err := readCPIO(b)
	require.NoError(t, err)
	require.Len(t, ents, 5)
	assert.Equal(t, "bin", ents[0].Name)
	assert.Equal(t, uint32(cpioModeDir|0o755), ents[0].Mode)
	assert.Equal(t, "hello", string(ents[1].Data))
	assert.Equal(t, uint32(cpioModeFile|0o755), ents[1].Mode)
	assert.Equal(t, "busybox", string(ents[2].Data))
	assert.Equal(t, uint32(cpioModeSymlink), ents[2].Mode&cpioModeType)
	assert.Equal(t, [2]uint32{5, 1}, [2]uint32{ents[3].RMajor, ents[3].RMinor})
	assert.Empty(t, ents[4].Data)
}

func TestCPIOWriterRejectsBadNames(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"", "/abs", "nul\x00"} {
		w := newCPIOWriter(&bytes.Buffer{})
		assert.Error(t, w.File(name, 0o644, nil), "name %q", name)
	}
}

// Every member of odd sizes keeps the next header 4-byte aligned, and two
// archives written back to back parse as the kernel parses them.
func TestCPIOConcatenatedArchives(t *testing.T) {
	t.Parallel()
	var first bytes.Buffer
	w := newCPIOWriter(&first)
	for i := range 7 {
		name := "f" + strings.Repeat("x", i) // name lengths 2..8 hit every padding case
		require.NoError(t, w.File(name, 0o644, bytes.Repeat([]byte{'a'}, i)))
	}
	require.NoError(t, w.Close())
	require.Zero(t, first.Len()%4)
	require.True(t, bytes.HasSuffix(bytes.TrimRight(first.Bytes(), "\x00"), []byte(cpioTrailer)),
		"archive ends with the trailer")

	cmd, err := CommandArchive([]string{"sh", "-c", "echo hi"})
	require.NoError(t, err)
	require.Zero(t, len(cmd)%4)
	require.True(t, bytes.HasSuffix(bytes.TrimRight(cmd, "\x00"), []byte(cpioTrailer)))

	// Zero padding between archives (as some tools emit) is skipped too.
	all := append(append(append([]byte{}, first.Bytes()...), make([]byte, 8)...), cmd...)
	ents, err := readCPIO(all)
	require.NoError(t, err)
	require.Len(t, ents, 9)
	last := ents[len(ents)-1]
	assert.Equal(t, "govmm/cmd", last.Name)
	assert.Equal(t, 1, last.ArchiveIndex)
	assert.Equal(t, "sh\x00-c\x00echo hi\x00", string(last.Data))
	assert.Equal(t, "govmm", ents[len(ents)-2].Name)
}

func TestCommandArchiveErrors(t *testing.T) {
	t.Parallel()
	_, err := CommandArchive(nil)
	assert.ErrorIs(t, err, ErrEmptyCommand)
	_, err = CommandArchive([]string{"a\x00b"})
	assert.Error(t, err)
}

func TestReadCPIORejectsTruncated(t *testing.T) {
	t.Parallel()
	b, err := CommandArchive([]string{"true"})
	require.NoError(t, err)
	_, err = readCPIO(b[:len(b)-20])
	assert.Error(t, err)
	_, err = readCPIO(b[:50])
	assert.Error(t, err)
}
