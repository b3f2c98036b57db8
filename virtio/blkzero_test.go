package virtio

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// zeroSegs writes discard/write-zeroes segments (sector, sectors, flags)
// at reqDataGPA and returns the buffer that carries them.
func (r *blkRig) zeroSegs(segs ...[3]uint64) gbuf {
	r.t.Helper()
	var b []byte
	for _, s := range segs {
		b = binary.LittleEndian.AppendUint64(b, s[0])
		b = binary.LittleEndian.AppendUint32(b, uint32(s[1]))
		b = binary.LittleEndian.AppendUint32(b, uint32(s[2]))
	}
	require.NoError(r.t, r.mem.WriteAt(b, reqDataGPA))
	return gbuf{reqDataGPA, uint32(len(b)), false}
}

// zeroed returns img with n bytes at off made zeros.
func zeroed(img []byte, off, n int) []byte {
	out := bytes.Clone(img)
	clear(out[off : off+n])
	return out
}

// isHole says whether the n bytes at off of the file at path are one hole.
func isHole(t *testing.T, path string, off, n int64) bool {
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true
	}
	require.NoError(t, err)
	return data >= off+n
}

func TestBlockZeroConfig(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	require.NotZero(t, r.d.offered()&blkFDiscard)
	require.NotZero(t, r.d.offered()&blkFWriteZeroes)
	assert.Equal(t, uint64(blkZeroMaxSectors), r.d.deviceCfg(36, 4), "max_discard_sectors")
	assert.Equal(t, uint64(blkZeroMaxSegs), r.d.deviceCfg(40, 4), "max_discard_seg")
	assert.Equal(t, uint64(8), r.d.deviceCfg(44, 4), "discard_sector_alignment")
	assert.Equal(t, uint64(blkZeroMaxSectors), r.d.deviceCfg(48, 4), "max_write_zeroes_sectors")
	assert.Equal(t, uint64(blkZeroMaxSegs), r.d.deviceCfg(52, 4), "max_write_zeroes_seg")
	assert.Equal(t, uint64(1), r.d.deviceCfg(56, 1), "write_zeroes_may_unmap")

	ro := newBlkRig(t, BlockConfig{ReadOnly: true})
	assert.Zero(t, ro.d.offered()&(blkFDiscard|blkFWriteZeroes), "a read-only disk offers neither")
	st, _ := ro.do(blkTDiscard, 0, ro.zeroSegs([3]uint64{0, 8, 0}))
	assert.Equal(t, byte(blkSIOErr), st)
}

// Discards and write-zeroes punch holes in the image, each changed range
// is reported to OnZero once, in order, and a request that is malformed
// anywhere, or refused, changes nothing.
func TestBlockDiscardAndWriteZeroes(t *testing.T) {
	img := newDiskImage(t)
	want, err := os.ReadFile(img)
	require.NoError(t, err)
	var mu sync.Mutex
	var zeros [][2]int64
	var refuse atomic.Bool
	r := newBlkRig(t, BlockConfig{Path: img,
		OnZero: func(off, n int64) error {
			mu.Lock()
			defer mu.Unlock()
			zeros = append(zeros, [2]int64{off, n})
			return nil
		},
		AllowWrite: func() error {
			if refuse.Load() {
				return errors.New("fenced")
			}
			return nil
		}})
	took := func() [][2]int64 {
		mu.Lock()
		defer mu.Unlock()
		z := zeros
		zeros = nil
		return z
	}
	check := func(t *testing.T, msg string) {
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		require.Equal(t, len(want), len(got), "the image keeps its size")
		assert.True(t, bytes.Equal(want, got), msg)
	}

	t.Run("discard two ranges", func(t *testing.T) {
		st, n := r.do(blkTDiscard, 0, r.zeroSegs([3]uint64{8, 16, 0}, [3]uint64{64, 8, 0}))
		require.Equal(t, byte(blkSOK), st)
		assert.Equal(t, uint32(1), n)
		want = zeroed(zeroed(want, 4096, 8192), 32768, 4096)
		check(t, "discarded ranges read as zeros, the rest as before")
		assert.True(t, isHole(t, img, 4096, 8192), "a hole was punched")
		assert.Equal(t, [][2]int64{{4096, 8192}, {32768, 4096}}, took())
	})
	t.Run("write zeroes, with and without unmap", func(t *testing.T) {
		st, _ := r.do(blkTWriteZeroes, 0, r.zeroSegs([3]uint64{100, 3, blkZeroFUnmap}))
		require.Equal(t, byte(blkSOK), st)
		st, _ = r.do(blkTWriteZeroes, 0, r.zeroSegs([3]uint64{200, 16, 0}))
		require.Equal(t, byte(blkSOK), st)
		want = zeroed(zeroed(want, 100*512, 3*512), 200*512, 16*512)
		check(t, "zeroed ranges read as zeros, even unaligned")
		assert.Equal(t, [][2]int64{{100 * 512, 3 * 512}, {200 * 512, 16 * 512}}, took())
	})
	bad := []struct {
		name   string
		typ    uint32
		status byte
		segs   [][3]uint64
	}{
		{"unmap flag on a discard", blkTDiscard, blkSUnsupp, [][3]uint64{{0, 8, blkZeroFUnmap}}},
		{"unknown flag", blkTWriteZeroes, blkSUnsupp, [][3]uint64{{0, 8, 2}}},
		{"second segment past the end", blkTDiscard, blkSIOErr, [][3]uint64{{0, 8, 0}, {diskSize/512 - 4, 8, 0}}},
		{"segment over the maximum", blkTWriteZeroes, blkSIOErr, [][3]uint64{{0, blkZeroMaxSectors + 1, 0}}},
		{"sector past the end", blkTDiscard, blkSIOErr, [][3]uint64{{diskSize/512 + 1, 0, 0}}},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			st, _ := r.do(tt.typ, 0, r.zeroSegs(tt.segs...))
			assert.Equal(t, tt.status, st)
			check(t, "nothing changed")
			assert.Empty(t, took())
		})
	}
	t.Run("torn segment", func(t *testing.T) {
		g := r.zeroSegs([3]uint64{0, 8, 0})
		g.len = 15
		st, _ := r.do(blkTDiscard, 0, g)
		assert.Equal(t, byte(blkSIOErr), st)
		st, _ = r.do(blkTDiscard, 0)
		assert.Equal(t, byte(blkSIOErr), st, "no segment at all")
		check(t, "nothing changed")
	})
	t.Run("refused", func(t *testing.T) {
		refuse.Store(true)
		defer refuse.Store(false)
		st, _ := r.do(blkTWriteZeroes, 0, r.zeroSegs([3]uint64{0, 8, 0}))
		assert.Equal(t, byte(blkSIOErr), st)
		check(t, "a fenced disk is not zeroed")
		assert.Empty(t, took())
	})
}

// On an image that cannot punch holes, a discard changes nothing and
// reports nothing, and a write-zeroes writes zeros.
func TestBlockZeroWithoutPunch(t *testing.T) {
	img := newDiskImage(t)
	want, err := os.ReadFile(img)
	require.NoError(t, err)
	var calls atomic.Int64
	r := newBlkRig(t, BlockConfig{Path: img, OnZero: func(int64, int64) error { calls.Add(1); return nil }})
	// The worker runs from NewBlock on: quiesced, it holds no request,
	// and Resume's lock orders this write before its next read.
	require.NoError(t, r.blk.Quiesce(context.Background()))
	r.blk.zeroer.NoPunch = true
	require.NoError(t, r.blk.Resume())
	st, _ := r.do(blkTDiscard, 0, r.zeroSegs([3]uint64{0, 16, 0}))
	require.Equal(t, byte(blkSOK), st)
	got, err := os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, want, got, "a discard is a hint")
	assert.Zero(t, calls.Load())

	st, _ = r.do(blkTWriteZeroes, 0, r.zeroSegs([3]uint64{16, 16, blkZeroFUnmap}))
	require.Equal(t, byte(blkSOK), st)
	got, err = os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, zeroed(want, 16*512, 16*512), got)
	assert.False(t, isHole(t, img, 16*512, 16*512), "written, not punched")
	assert.Equal(t, int64(1), calls.Load())
}

// allocated returns the bytes the file at path has allocated.
func allocated(t *testing.T, path string) int64 {
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	return st.Blocks * 512
}

// A disk kept allocated (--disk ...,nodiscard) offers no discard and
// refuses one sent anyway; its write-zeroes zero in place, with or
// without the unmap flag, and the image keeps every block.
func TestBlockNoDiscard(t *testing.T) {
	img := newDiskImage(t)
	want, err := os.ReadFile(img)
	require.NoError(t, err)
	full := allocated(t, img)
	require.GreaterOrEqual(t, full, int64(diskSize))
	var calls atomic.Int64
	r := newBlkRig(t, BlockConfig{Path: img, NoDiscard: true, OnZero: func(int64, int64) error { calls.Add(1); return nil }})
	assert.Zero(t, r.d.offered()&blkFDiscard, "discard is not offered")
	require.NotZero(t, r.d.offered()&blkFWriteZeroes)
	assert.Equal(t, uint64(0), r.d.deviceCfg(56, 1), "write_zeroes_may_unmap")

	st, _ := r.do(blkTDiscard, 0, r.zeroSegs([3]uint64{0, 16, 0}))
	assert.Equal(t, byte(blkSUnsupp), st)
	got, err := os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, want, got, "a discard changes nothing")
	assert.Zero(t, calls.Load())

	st, _ = r.do(blkTWriteZeroes, 0, r.zeroSegs([3]uint64{16, 64, blkZeroFUnmap}, [3]uint64{200, 3, 0}))
	require.Equal(t, byte(blkSOK), st)
	got, err = os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, zeroed(zeroed(want, 16*512, 64*512), 200*512, 3*512), got)
	assert.Equal(t, full, allocated(t, img), "no block was given back")
	assert.Equal(t, int64(2), calls.Load())
}

// An ImageZeroer that keeps its image allocated fills a hole it zeros:
// a standby's copy of a sparse disk becomes fully allocated.
func TestImageZeroerKeepAllocated(t *testing.T) {
	p := filepath.Join(t.TempDir(), "sparse.img")
	f, err := os.Create(p)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(1<<20))
	_, err = f.WriteAt(bytes.Repeat([]byte{0xaa}, 4096), 0)
	require.NoError(t, err)
	require.NoError(t, f.Sync())
	require.Less(t, allocated(t, p), int64(64<<10), "sparse to begin with")

	z := ImageZeroer{F: f, KeepAllocated: true}
	punched, err := z.Punch(0, 4096)
	require.NoError(t, err)
	assert.False(t, punched, "never punches")
	require.NoError(t, z.Zero(0, 1<<20))
	require.NoError(t, f.Sync())
	got, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, make([]byte, 1<<20), got)
	assert.GreaterOrEqual(t, allocated(t, p), int64(1<<20), "every block allocated")

	punch := ImageZeroer{F: f}
	punched, err = punch.Punch(0, 64<<10)
	require.NoError(t, err)
	require.True(t, punched)
	require.Less(t, allocated(t, p), int64(1<<20))
	w := ImageZeroer{F: f, KeepAllocated: true, noZeroRange: true} // as on a file system without ZERO_RANGE
	require.NoError(t, w.Zero(0, 64<<10))
	require.NoError(t, f.Sync())
	assert.GreaterOrEqual(t, allocated(t, p), int64(1<<20), "zeros written fill the hole")
}
