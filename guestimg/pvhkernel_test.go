package guestimg

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// smallVmlinux is a vmlinux with one loadable segment (fill's bytes) and
// a PVH-style note.
func smallVmlinux(fill byte) []byte {
	note := bytes.Join([][]byte{{4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0}, []byte("Xen\x00"), {0x40, 0x10, 0x10, 0, 0, 0, 0, 0}}, nil)
	text := bytes.Repeat([]byte{fill}, 3*4096)
	return testVmlinux([]testSeg{
		{typ: elf.PT_LOAD, paddr: 1 << 20, mem: uint64(len(text)), data: text, align: 2 << 20, vOff: 0xffffffff80000000},
		{typ: elf.PT_NOTE, paddr: 1<<20 + 100, mem: uint64(len(note)), data: note, align: 4},
	})
}

// testBzImage wraps a compressed payload in a bzImage's setup header
// (boot protocol 2.15, one setup sector), after 64 bytes of stand-in
// decompressor, with the 4-byte uncompressed size the kernel's build
// appends.
func testBzImage(payload []byte, size int) []byte {
	const sects = 1
	le := binary.LittleEndian
	b := make([]byte, (sects+1)*512+64)
	b[hdrSetupSects] = sects
	copy(b[hdrMagic:], "HdrS")
	le.PutUint16(b[hdrVersion:], 0x020f)
	le.PutUint32(b[hdrPayloadOffset:], 64)
	payload = le.AppendUint32(append([]byte(nil), payload...), uint32(size))
	le.PutUint32(b[hdrPayloadLength:], uint32(len(payload)))
	return append(b, payload...)
}

func compressWith(t *testing.T, codec string, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	switch codec {
	case "gzip":
		w := gzip.NewWriter(&out)
		_, err := w.Write(b)
		require.NoError(t, err)
		require.NoError(t, w.Close())
	case "zstd":
		w, err := zstd.NewWriter(&out)
		require.NoError(t, err)
		_, err = w.Write(b)
		require.NoError(t, err)
		require.NoError(t, w.Close())
	case "xz":
		cmd := exec.Command("xz", "--compress", "--stdout", "--check=crc32", "--x86", "--lzma2")
		cmd.Stdin = bytes.NewReader(b)
		o, err := cmd.Output()
		require.NoError(t, err)
		out.Write(o)
	}
	return out.Bytes()
}

// Each codec a distribution's kernel comes in gives back the very ELF
// file that went in; the size the kernel's build appends is not taken
// for part of the stream.
func TestExtractVmlinuxCodecs(t *testing.T) {
	t.Parallel()
	vm := smallVmlinux(0x5a)
	for _, codec := range []string{"gzip", "zstd", "xz"} {
		t.Run(codec, func(t *testing.T) {
			if codec == "xz" {
				if _, err := exec.LookPath("xz"); err != nil {
					t.Fatalf("xz (the image build needs it, scripts/deps.sh installs it): %v", err)
				}
			}
			bz := testBzImage(compressWith(t, codec, vm), len(vm))
			got, err := ExtractVmlinux(context.Background(), bz)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(vm, got), "%s: %d bytes back, want %d", codec, len(got), len(vm))
		})
	}
	_, err := ExtractVmlinux(context.Background(), testBzImage([]byte("LZ4!not a kernel"), 16))
	assert.ErrorIs(t, err, ErrNoPayload)
	_, err = ExtractVmlinux(context.Background(), vm)
	assert.ErrorIs(t, err, ErrNoPayload, "an ELF file has no setup header")
}

// The cache extracts a bzImage's kernel once: later calls, for the same
// file or a copy of it, return the same entry without extracting or
// vetting again; a kernel the VMM refused is remembered as refused; a
// file rewritten with another kernel gets an entry of its own.
func TestPVHKernelCache(t *testing.T) {
	t.Parallel()
	cache, files := t.TempDir(), t.TempDir()
	vetted := 0
	accept := func(k []byte) error {
		vetted++
		_, err := elf.NewFile(bytes.NewReader(k))
		return err
	}
	ctx := context.Background()
	vmA := smallVmlinux(0xa1)
	bzA := testBzImage(compressWith(t, "gzip", vmA), len(vmA))
	pathA := filepath.Join(files, "vmlinuz-a")
	require.NoError(t, os.WriteFile(pathA, bzA, 0o644))

	p1, err := PVHKernel(ctx, cache, pathA, bzA, accept)
	require.NoError(t, err)
	assert.Equal(t, 1, vetted)
	k, err := os.ReadFile(p1)
	require.NoError(t, err)
	trimmed, err := TrimVmlinux(vmA)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(trimmed, k), "the entry is the packed kernel")

	p2, err := PVHKernel(ctx, cache, pathA, bzA, accept)
	require.NoError(t, err)
	assert.Equal(t, p1, p2)
	copyA := filepath.Join(files, "copy-of-a")
	require.NoError(t, os.WriteFile(copyA, bzA, 0o644))
	p3, err := PVHKernel(ctx, cache, copyA, bzA, accept)
	require.NoError(t, err)
	assert.Equal(t, p1, p3, "a copy hashes the same")
	assert.Equal(t, 1, vetted, "extracted and vetted once")

	// Refused: remembered, with the reason.
	refuse := func([]byte) error { vetted++; return errors.New("no PVH note here") }
	vmB := smallVmlinux(0xb2)
	bzB := testBzImage(compressWith(t, "zstd", vmB), len(vmB))
	pathB := filepath.Join(files, "vmlinuz-b")
	require.NoError(t, os.WriteFile(pathB, bzB, 0o644))
	_, err = PVHKernel(ctx, cache, pathB, bzB, refuse)
	require.ErrorIs(t, err, ErrNoPVHKernel)
	_, err = PVHKernel(ctx, cache, pathB, bzB, refuse)
	require.ErrorIs(t, err, ErrNoPVHKernel)
	assert.Contains(t, err.Error(), "no PVH note here")
	assert.Equal(t, 2, vetted, "a refused kernel is vetted once")

	// The same path rewritten with another kernel: the file's identity
	// changed, so its contents are hashed anew.
	vmC := smallVmlinux(0xc3)
	bzC := testBzImage(compressWith(t, "gzip", vmC), len(vmC))
	later := time.Now().Add(2 * time.Second)
	require.NoError(t, os.WriteFile(pathA, bzC, 0o644))
	require.NoError(t, os.Chtimes(pathA, later, later))
	p4, err := PVHKernel(ctx, cache, pathA, bzC, accept)
	require.NoError(t, err)
	assert.NotEqual(t, p1, p4)
	assert.Equal(t, 3, vetted)

	// Corrupt payload: not a kernel, remembered as such.
	bad := testBzImage([]byte{0x1f, 0x8b, 8, 0, 0, 0}, 100)
	pathBad := filepath.Join(files, "bad")
	require.NoError(t, os.WriteFile(pathBad, bad, 0o644))
	_, err = PVHKernel(ctx, cache, pathBad, bad, accept)
	require.ErrorIs(t, err, ErrNoPVHKernel)
	require.ErrorIs(t, err, ErrNoPayload)
	assert.Equal(t, 3, vetted, "nothing extracted, nothing vetted")
	entries, err := filepath.Glob(filepath.Join(cache, "pvh", "*.tmp"))
	require.NoError(t, err)
	assert.Empty(t, entries, "no temporary file left")
}

// The cache keeps the most recently used kernels: making a fifth removes
// the one least recently used, and a hit counts as a use.
func TestPVHKernelCacheKeepsRecent(t *testing.T) {
	t.Parallel()
	cache, files := t.TempDir(), t.TempDir()
	ctx := context.Background()
	var paths []string
	mk := func(i int) string {
		t.Helper()
		vm := smallVmlinux(byte(0x10 + i))
		bz := testBzImage(compressWith(t, "gzip", vm), len(vm))
		f := filepath.Join(files, fmt.Sprintf("k%d", i))
		require.NoError(t, os.WriteFile(f, bz, 0o644))
		p, err := PVHKernel(ctx, cache, f, bz, nil)
		require.NoError(t, err)
		// Modification times a second apart: the order does not rest on
		// the file system's timestamp granularity.
		at := time.Now().Add(time.Duration(i-10) * time.Second)
		require.NoError(t, os.Chtimes(p, at, at))
		return p
	}
	for i := range pvhCacheKeep {
		paths = append(paths, mk(i))
	}
	// Kernel 0, the oldest, is used again: now kernel 1 is the oldest.
	bz0, err := os.ReadFile(filepath.Join(files, "k0"))
	require.NoError(t, err)
	p0, err := PVHKernel(ctx, cache, filepath.Join(files, "k0"), bz0, nil)
	require.NoError(t, err)
	require.Equal(t, paths[0], p0)
	paths = append(paths, mk(pvhCacheKeep))
	left, err := filepath.Glob(filepath.Join(cache, "pvh", "*.vmlinux"))
	require.NoError(t, err)
	assert.Len(t, left, pvhCacheKeep)
	assert.NoFileExists(t, paths[1], "the least recently used goes")
	for _, p := range []string{paths[0], paths[2], paths[pvhCacheKeep]} {
		assert.FileExists(t, p)
	}
}
