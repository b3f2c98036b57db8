package replicate

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/replicate/stream"
	"govmm/virtio"
)

// sparseFile makes a file of size bytes, a hole but for data at each of
// the offsets (random bytes, n each).
func sparseFile(t *testing.T, name string, size int64, n int, offsets ...int64) (string, *os.File) {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, f.Truncate(size))
	rng := rand.NewChaCha8([32]byte{byte(len(offsets))})
	for _, off := range offsets {
		b := make([]byte, n)
		_, _ = rng.Read(b)
		_, err := f.WriteAt(b, off)
		require.NoError(t, err)
	}
	require.NoError(t, f.Sync())
	return p, f
}

// allocated is how many bytes of f's file system blocks f holds.
func allocated(t *testing.T, f *os.File) int64 {
	t.Helper()
	var st syscall.Stat_t
	require.NoError(t, syscall.Fstat(int(f.Fd()), &st))
	return st.Blocks * 512
}

// garbageFile makes a fully written file of size random bytes (from
// seed) in dir, open for reading and writing.
func garbageFile(t *testing.T, dir, name string, size int, seed byte) (string, *os.File) {
	t.Helper()
	p := filepath.Join(dir, name)
	b := make([]byte, size)
	_, _ = rand.NewChaCha8([32]byte{seed}).Read(b)
	require.NoError(t, os.WriteFile(p, b, 0o644))
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return p, f
}

// extent tells a disk image's holes from its data.
func TestDiskLogExtents(t *testing.T) {
	const size = 8 << 20
	_, f := sparseFile(t, "disk.img", size, 8192, 0, 3<<20)
	d := NewDiskLog(f, size)
	for _, c := range []struct {
		off, end int64
		hole     bool
		until    int64
	}{
		{0, size, false, 8192},
		{4096, size, false, 8192},
		{8192, size, true, 3 << 20},
		{8192, 1 << 20, true, 1 << 20}, // at most end
		{3 << 20, size, false, 3<<20 + 8192},
		{3<<20 + 8192, size, true, size}, // no data to the end of the file
	} {
		hole, until := d.extent(c.off, c.end)
		require.Equal(t, c.hole, hole, "extent(%d, %d)", c.off, c.end)
		require.Equal(t, c.until, until, "extent(%d, %d)", c.off, c.end)
	}
	// A source that is not a file cannot tell: all data.
	hole, until := NewDiskLog(bytes.NewReader(make([]byte, size)), size).extent(8192, size)
	require.False(t, hole)
	require.Equal(t, int64(size), until)
}

// The standby applies zero runs as holes (its copy stays sparse, and what
// was there reads as zeros), in order with the writes, while copying
// directly and staged; a disk that cannot punch gets zeros written, with
// the same contents.
func TestDiskSinkZeroRuns(t *testing.T) {
	for _, punch := range []bool{true, false} {
		const size = 4 << 20
		p, f := garbageFile(t, t.TempDir(), "standby.img", size, 9)
		s, err := newDiskSink([]*os.File{f}, nil)
		require.NoError(t, err)
		s.zeroers[0].NoPunch = !punch
		want := make([]byte, size)
		data := bytes.Repeat([]byte("data"), 1024)

		// The initial copy: straight to the disk, runs merged.
		require.NoError(t, s.Begin(1, stream.KindInitialSync))
		require.True(t, s.direct)
		require.NoError(t, s.StageWrite(0, 0, data))
		copy(want, data)
		for off := int64(4096); off < size-4096; off += 1 << 20 {
			require.NoError(t, s.StageZero(0, off, min(1<<20, size-4096-off)))
		}
		require.NoError(t, s.StageWrite(0, size-4096, data))
		copy(want[size-4096:], data)
		require.NoError(t, s.Commit())
		got, err := os.ReadFile(p)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got), "punch %v: after the initial copy", punch)
		if punch {
			require.Less(t, allocated(t, f), int64(1<<20), "the standby's copy stays sparse")
		} else {
			require.GreaterOrEqual(t, allocated(t, f), int64(size), "zeros written")
		}

		// A resumable checkpoint: staged, applied at commit, in order.
		require.NoError(t, s.Begin(2, stream.KindEpoch))
		require.False(t, s.direct)
		require.NoError(t, s.StageWrite(0, 1<<20, data))
		require.NoError(t, s.StageZero(0, 0, 8192))     // over the first write of the copy
		require.NoError(t, s.StageZero(0, 8192, 1<<20)) // merged with the run before
		require.NoError(t, s.StageWrite(0, 1<<20, data[:100]))
		require.Len(t, s.staged, 3)
		copy(want[1<<20:], data)
		clear(want[0 : 8192+1<<20])
		copy(want[1<<20:], data[:100])
		got, err = os.ReadFile(p)
		require.NoError(t, err)
		require.False(t, bytes.Equal(want, got), "punch %v: nothing applied before the commit", punch)
		require.NoError(t, s.Commit())
		got, err = os.ReadFile(p)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got), "punch %v: after the checkpoint", punch)

		// Out of range, like a write.
		require.Error(t, s.StageZero(0, size-4096, 8192))
		require.Error(t, s.StageZero(1, 0, 4096))
	}
}

// A sparse disk replicated to a standby whose copy is garbage: the holes
// travel as zero runs, the standby's copy equals the primary's (holes,
// data, a block of written zeros, a write into a hole made during the
// copy) and stays about as sparse as the primary's, or, kept allocated
// (--disk ...,nodiscard), holds every block.
func TestReplicatedSparseDisk(t *testing.T) {
	kvmtest.Require(t)
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep allocated %v", keep), func(t *testing.T) { replicateSparseDisk(t, keep) })
	}
}

func replicateSparseDisk(t *testing.T, keep bool) {
	const size = 64 << 20
	primaryDisk, pf := sparseFile(t, "primary.img", size, 256<<10, 0, 20<<20, 63<<20)
	_, err := pf.WriteAt(make([]byte, 1<<20), 40<<20) // written zeros: data to the file system
	require.NoError(t, err)
	standbyDisk, sf := garbageFile(t, t.TempDir(), "standby.img", size, 9)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	src := &countingFile{File: pf}
	log := NewDiskLog(src, size)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{sf},
		KeepAllocated: []bool{keep}, FailoverTimeout: 5 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	defer sb.Close()
	receive(t, sb)
	wrote := make(chan error, 1)
	go func() {
		// A guest write into a hole while the disk is being copied (the
		// device writes, then records).
		time.Sleep(time.Millisecond)
		line := []byte("written into a hole during the copy")
		_, err := pf.WriteAt(line, 50<<20)
		if err == nil {
			err = log.Record(50<<20, line)
		}
		wrote <- err
	}()
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 5 * time.Second, Disks: []*DiskLog{log}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.NoError(t, <-wrote)
	waitCaughtUp(t, prim, rep)
	read := src.read.Load()
	t.Logf("the initial copy read %d KiB of the %d KiB disk", read>>10, size>>10)
	require.Less(t, read, int64(4<<20), "the holes were sent without reading them")
	want, err := os.ReadFile(primaryDisk)
	require.NoError(t, err)
	require.Contains(t, string(want[50<<20:]), "written into a hole during the copy")
	got, err := os.ReadFile(standbyDisk)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the standby's disk equals the primary's")
	pa, sa := allocated(t, pf), allocated(t, sf)
	t.Logf("allocated: primary %d KiB, standby %d KiB, of %d KiB", pa>>10, sa>>10, size>>10)
	if keep {
		require.GreaterOrEqual(t, sa, int64(size), "the standby's copy holds every block")
	} else {
		require.LessOrEqual(t, sa, pa+(1<<20), "the standby's copy is about as sparse as the primary's")
	}
	require.GreaterOrEqual(t, rep.Stats().Stream.DiskBytes, uint64(size), "the whole disk went over, holes as zero runs")
}

// countingFile counts the bytes read through ReadAt; Fd is the file's,
// so holes can be told.
type countingFile struct {
	*os.File
	read atomic.Int64
}

func (c *countingFile) ReadAt(b []byte, off int64) (int, error) {
	n, err := c.File.ReadAt(b, off)
	c.read.Add(int64(n))
	return n, err
}

// A guest's discards reach the standby as zero runs: its copy ends up
// equal to the primary's and as sparse. One discard covers twice more
// than a checkpoint's disk data may hold (a mkfs, or blkdiscard of the
// whole disk): a run costs 64 bytes a MiB toward the cap, so nothing
// fails.
func TestReplicatedDiscard(t *testing.T) {
	kvmtest.Require(t)
	const size = 2 * MaxEpochDiskBytes
	primaryDisk, pf := sparseFile(t, "primary.img", size, 1<<20, 0, 100<<20, size-1<<20)
	standbyDisk, sf := sparseFile(t, "standby.img", size, 4096, 200<<20)
	prim, log, sb, rep := protectDisk(t, pf, size, sf)
	defer sb.Close()

	// What the virtio-blk device does: change the image, then the hook.
	z := virtio.ImageZeroer{F: pf}
	discard := func(off, n int64) {
		punched, err := z.Punch(off, n)
		require.NoError(t, err)
		require.True(t, punched, "the test's file system punches holes")
		require.NoError(t, log.RecordZero(off, n))
	}
	line := []byte("written after the discard")
	discard(0, size)
	_, err := pf.WriteAt(line, 300<<20)
	require.NoError(t, err)
	require.NoError(t, log.Record(300<<20, line))
	discard(size-4096, 4096)
	waitCaughtUp(t, prim, rep)

	want, err := os.ReadFile(primaryDisk)
	require.NoError(t, err)
	require.Equal(t, line, want[300<<20:300<<20+len(line)])
	got, err := os.ReadFile(standbyDisk)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the standby's disk equals the primary's")
	pa, sa := allocated(t, pf), allocated(t, sf)
	t.Logf("allocated after the discards: primary %d KiB, standby %d KiB, of %d MiB", pa>>10, sa>>10, size>>20)
	require.LessOrEqual(t, sa, int64(64<<10), "the standby punched the discarded ranges")

	// The operator sees what the guest did to the disk, and what the
	// stream carried (the initial sync's whole disk, then the runs and the
	// line).
	ms := rep.Metrics()
	require.Equal(t, float64(len(line)), metricValue(t, ms, "govmm_replication_disk_written_bytes_total"))
	require.Equal(t, float64(size+4096), metricValue(t, ms, "govmm_replication_disk_zeroed_bytes_total"))
	require.Equal(t, float64(2*size+4096+int64(len(line))), metricValue(t, ms, "govmm_stream_sent_disk_bytes_total"))
	require.Equal(t, metricValue(t, ms, "govmm_stream_sent_disk_bytes_total"), metricValue(t, sb.Metrics(), "govmm_stream_received_disk_bytes_total"), "the standby received what was sent")
}

// RecordZero merges a run with the one it follows, costs stream.ZeroCost
// toward the epoch's cap (a whole large disk fits), and keeps its place
// among the writes.
func TestDiskLogRecordZero(t *testing.T) {
	d := NewDiskLog(bytes.NewReader(nil), 0)
	require.NoError(t, d.RecordZero(0, 4096))
	require.Empty(t, d.Take(), "not armed")
	d.Arm()
	require.NoError(t, d.RecordZero(0, 1<<20))
	require.NoError(t, d.RecordZero(1<<20, 1<<40)) // 1 TiB more
	require.NoError(t, d.Record(4096, []byte("w")))
	require.NoError(t, d.RecordZero(8192, 4096))
	require.NoError(t, d.RecordZero(16384, 4096)) // not adjacent
	require.Equal(t, []DiskWrite{{Off: 0, Zero: 1<<20 + 1<<40}, {Off: 4096, Data: []byte("w")},
		{Off: 8192, Zero: 4096}, {Off: 16384, Zero: 4096}}, d.Take())
	require.NoError(t, d.Record(0, make([]byte, MaxEpochDiskBytes-int(stream.ZeroCost(1)))))
	require.NoError(t, d.RecordZero(0, 1), "a run costs ZeroRunCost")
	require.ErrorIs(t, d.RecordZero(1, 1<<20), ErrDiskEpochFull, "merged, the run would cost one frame more")
	require.ErrorIs(t, d.RecordZero(4<<20, 1), ErrDiskEpochFull)
}
