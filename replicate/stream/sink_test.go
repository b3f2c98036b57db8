package stream

import (
	"bytes"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"govmm/vmm/guestmem"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestStagingSink(t *testing.T) {
	mem := map[GPA][]byte{}
	dest := pageWriterFunc(func(p []byte, gpa GPA) error { mem[gpa] = bytes.Clone(p); return nil })
	s := &StagingSink{Dest: dest}

	// Initial sync: straight to memory, nothing resumable to protect yet.
	require.NoError(t, s.Begin(1, KindInitialSync))
	require.NoError(t, s.StagePage(0, page(1)))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())

	// An epoch is staged until commit, and an abort leaves memory alone.
	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(0, page(2)))
	require.NoError(t, s.StagePage(PageSize, nil))
	assert.Equal(t, page(1), mem[0])
	require.NoError(t, s.Commit())
	assert.Equal(t, page(2), mem[0])
	assert.Equal(t, make([]byte, PageSize), mem[PageSize])

	require.NoError(t, s.Begin(3, KindEpoch))
	require.NoError(t, s.StagePage(0, page(3)))
	s.Abort()
	assert.Equal(t, page(2), mem[0])
}

// flatMem is memory a sink can read in place; it counts the writes (a
// large commit writes from several goroutines).
type flatMem struct {
	b      []byte
	writes atomic.Int64
}

func (m *flatMem) WriteAt(p []byte, gpa GPA) error { m.writes.Add(1); copy(m.b[gpa:], p); return nil }
func (m *flatMem) Slice(gpa GPA, n uint64) ([]byte, error) {
	return m.b[gpa : uint64(gpa)+n], nil
}

// A zero page is written only over a page that is not zero already, in
// initial sync (fresh memory stays untouched) and on commit alike.
func TestStagingSinkSkipsZeroOverZero(t *testing.T) {
	mem := &flatMem{b: make([]byte, 4*PageSize)}
	s := &StagingSink{Dest: mem}
	require.NoError(t, s.Begin(1, KindInitialSync))
	require.NoError(t, s.StagePage(0, nil))
	require.NoError(t, s.StagePage(PageSize, page(1)))
	require.NoError(t, s.Commit())
	assert.Equal(t, int64(1), mem.writes.Load(), "only the non-zero page was written")

	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(PageSize, nil))   // over page(1): written
	require.NoError(t, s.StagePage(2*PageSize, nil)) // over zeros: skipped
	require.NoError(t, s.Commit())
	assert.Equal(t, int64(2), mem.writes.Load())
	assert.Equal(t, make([]byte, 4*PageSize), mem.b)
}

type pageWriterFunc func(p []byte, gpa GPA) error

func (f pageWriterFunc) WriteAt(p []byte, gpa GPA) error { return f(p, gpa) }

// stageMany begins checkpoint 1 on s and stages npages pages, every
// fifth one zero, then page 1 again with other bytes; it returns the
// memory the commit must leave (where it was all zero before) and how
// many distinct non-zero pages it staged.
func stageMany(t *testing.T, s *StagingSink, npages int) (want []byte, nonzero int) {
	require.NoError(t, s.Begin(1, KindEpoch))
	want = make([]byte, npages*PageSize)
	for i := range npages {
		p := page(uint64(i) + 7)
		if i%5 == 4 {
			p = nil
		} else {
			nonzero++
		}
		require.NoError(t, s.StagePage(GPA(i*PageSize), p))
		copy(want[i*PageSize:], p)
	}
	require.NoError(t, s.StagePage(PageSize, page(12345)))
	copy(want[PageSize:], page(12345))
	return want, nonzero
}

// A large checkpoint commits on several goroutines: every page lands,
// zero pages included, and a page staged twice ends as its last version.
func TestStagingSinkParallelCommit(t *testing.T) {
	const npages = 3 * commitSplit
	dest := make(memWriter, npages*PageSize)
	s := &StagingSink{Dest: dest}
	want, _ := stageMany(t, s, npages)
	copy(dest[4*PageSize:], page(99)) // a zero page lands over a non-zero one
	require.NoError(t, s.Commit())
	assert.True(t, bytes.Equal(want, dest), "memory after commit")
}

// Into guest memory (as a standby's), a commit's apply writes through an
// NTWriter per goroutine: every page lands, a zero page over a non-zero
// one is written and one over zeros is not, a page staged twice ends as
// its last version, every page written is marked dirty once the commit
// is applied (the NTWriters flushed), and the next commit applies too.
func TestStagingSinkIntoGuestMemory(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(5)) // four apply goroutines
	const npages = 3 * commitSplit
	mem, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: npages * PageSize}})
	require.NoError(t, err)
	defer mem.Close()
	require.NoError(t, mem.WriteAt(page(99), 4*PageSize)) // under a zero page
	mem.Regions()[0].HarvestVMMDirty(make([]uint64, mem.Regions()[0].BitmapWords()))
	s := &StagingSink{Dest: mem}
	want, nonzero := stageMany(t, s, npages)
	require.NoError(t, s.Commit())
	got := make([]byte, npages*PageSize)
	require.NoError(t, mem.ReadAt(got, 0))
	assert.True(t, bytes.Equal(want, got), "memory after commit")
	assert.Equal(t, nonzero+1, mem.Regions()[0].VMMDirtyCount(), "pages marked dirty: the non-zero ones and the zero page over page(99)")

	require.NoError(t, s.Begin(2, KindEpoch))
	require.NoError(t, s.StagePage(0, page(5)))
	require.NoError(t, s.Commit())
	require.NoError(t, mem.ReadAt(got[:PageSize], 0))
	assert.Equal(t, page(5), got[:PageSize])
}

// A StagingSink keeps the pages of each Pages frame in the frame's own
// buffer until commit (keeper): over several frames, keyed, unkeyed and
// compressed, memory after each ack is the checkpoint's, the reader's
// buffers are reused from one checkpoint to the next, and a checkpoint
// whose End does not verify leaves memory as the last commit left it.
func TestStagingSinkKeepsFrames(t *testing.T) {
	for _, tt := range []struct {
		name  string
		keyed bool
		comp  Compression
	}{
		{"keyed", true, CompressNone},
		{"unkeyed", false, CompressNone},
		{"keyed s2", true, CompressS2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			if !tt.keyed {
				scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
			}
			scfg.Compression = tt.comp
			mem := &flatMem{b: make([]byte, 4<<20)}
			rcfg.Sink = &StagingSink{Dest: mem}
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			const n = 1000 // four Pages frames
			want := func(epoch uint64) []byte {
				b := make([]byte, 4<<20)
				for i := range n {
					if i%3 != 2 {
						copy(b[i*PageSize:], page(epoch*1000+uint64(i)))
					}
				}
				return b
			}
			for epoch := uint64(1); epoch <= 3; epoch++ {
				require.NoError(t, sendCheckpoint(s, epoch, KindEpoch, n, []byte("s")))
				require.NoError(t, s.WaitAck(t.Context(), epoch))
				rcfg.Sink.(*StagingSink).waitApplied() // the ack does not wait for the copy into memory
				require.True(t, bytes.Equal(want(epoch), mem.b), "memory after checkpoint %d", epoch)
			}
			require.NoError(t, s.BeginCheckpoint(4, KindEpoch))
			for i := range n {
				require.NoError(t, s.SendPage(GPA(i*PageSize), page(9)))
			}
			require.NoError(t, s.flushPages())
			forge(t, s, frameEnd, appendEnd(nil, endInfo{epoch: 4, pages: n, sum: 1}))
			require.ErrorIs(t, waitErr(t, run), ErrChecksum)
			assert.Equal(t, uint64(3), r.Committed())
			assert.True(t, bytes.Equal(want(3), mem.b), "memory as checkpoint 3 left it")
		})
	}
}

// gatedMem is flatMem whose writes wait until open is closed, or fail
// with fail when it is set.
type gatedMem struct {
	flatMem
	open chan struct{}
	fail error
}

func (m *gatedMem) WriteAt(p []byte, gpa GPA) error {
	<-m.open
	if m.fail != nil {
		return m.fail
	}
	return m.flatMem.WriteAt(p, gpa)
}

// A Receiver acknowledges a checkpoint once it holds all of it, before
// the copy into memory (asyncCommitter), and Run does not return before
// that copy is whole: with memory that takes no write, the ack comes
// anyway, and once memory takes writes again, what Run leaves behind is
// the checkpoint.
func TestAckBeforeApply(t *testing.T) {
	const n = 1000
	s, _, run, mem := gatedStandby(t, n)
	assert.Equal(t, int64(0), mem.writes.Load(), "nothing applied yet")
	require.NoError(t, s.Close())
	close(mem.open)
	require.NoError(t, waitErr(t, run))
	assert.True(t, bytes.Equal(checkpointMemory(1, n, len(mem.b)), mem.b), "memory when Run returned")
}

// gatedStandby is a Sender and a running Receiver whose StagingSink
// writes into 4 MiB of memory that takes no write until mem.open is
// closed, after checkpoint 1 of n pages (sendCheckpoint) was acked: the
// ack waits for no write into memory.
func gatedStandby(t *testing.T, n int) (s *Sender, r *Receiver, run <-chan error, mem *gatedMem) {
	t.Helper()
	scfg, rcfg := cfgs(newFakeClock())
	mem = &gatedMem{flatMem: flatMem{b: make([]byte, 4<<20)}, open: make(chan struct{})}
	rcfg.Sink = &StagingSink{Dest: mem}
	s, r = pipePair(t, scfg, rcfg)
	run = runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, n, []byte("s")))
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1), "the ack waits for no write into memory")
	return s, r, run, mem
}

// checkpointMemory is memory of size bytes, zero, after sendCheckpoint's
// checkpoint epoch of n pages.
func checkpointMemory(epoch uint64, n, size int) []byte {
	want := make([]byte, size)
	for i := range n {
		if i%3 != 2 {
			copy(want[i*PageSize:], page(epoch*1000+uint64(i)))
		}
	}
	return want
}

// While a committed checkpoint is copied into memory, the next one is
// staged (from overlapPages pages; here any): with memory that takes no
// write, the receiver stages every page of checkpoint 2 after acking
// checkpoint 1; 2 is acknowledged only once 1's copy is whole (its own
// copy must come after), and memory then holds 2's pages where both
// wrote.
func TestNextCheckpointStagedWhileApplying(t *testing.T) {
	defer func(n uint64) { overlapPages = n }(overlapPages)
	overlapPages = 0 // checkpoints of any size
	const n = 600
	s, r, run, mem := gatedStandby(t, n)
	sent := make(chan error, 1)
	go func() { sent <- sendCheckpoint(s, 2, KindEpoch, n, []byte("t")) }()
	require.Eventually(t, func() bool { return r.Stats().Pages == 2*n }, 10*time.Second, time.Millisecond,
		"checkpoint 2's pages staged while 1's copy waits")
	require.NoError(t, <-sent)
	assert.Equal(t, int64(0), mem.writes.Load(), "nothing applied yet")
	assert.Error(t, s.WaitAck(ctxTimeout(t, 50*time.Millisecond), 2), "no ack of 2 before 1 is in memory")
	assert.Equal(t, uint64(1), r.Committed())
	close(mem.open)
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 2))
	require.NoError(t, s.Close())
	require.NoError(t, waitErr(t, run))
	assert.True(t, bytes.Equal(checkpointMemory(2, n, len(mem.b)), mem.b), "memory holds checkpoint 2 when Run returned")
}

// boundedMem is flatMem that says which ranges it holds (rangeChecker).
type boundedMem struct{ flatMem }

func (m *boundedMem) Contains(gpa GPA, n uint64) bool { return uint64(gpa)+n <= uint64(len(m.b)) }

// A page outside the standby's memory is refused as it is staged, before
// its checkpoint commits and is acknowledged: the copy into memory after
// the ack (TestAckBeforeApply) has nothing left that could fail for what
// the stream sent. Nothing of the checkpoint reaches memory.
func TestPageOutsideMemoryRefusedBeforeTheAck(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	mem := &boundedMem{flatMem{b: make([]byte, 8*PageSize)}}
	rcfg.Sink = &StagingSink{Dest: mem}
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	_ = sendCheckpoint(s, 1, KindEpoch, 10, []byte("s")) // pages 8 and 9 lie outside; may fail as the receiver refuses it
	err := waitErr(t, run)
	require.ErrorIs(t, err, ErrOutOfRange)
	assert.Zero(t, r.Committed())
	assert.Zero(t, mem.writes.Load(), "nothing of the checkpoint was applied")
	require.Error(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1), "no ack")
}

// A checkpoint whose copy into memory fails after its ack fails the
// stream at the next checkpoint's end, before it commits or is
// acknowledged, with ErrCommit (the standby's memory is unusable), and
// Run says so even if the sender says goodbye first.
func TestApplyFailureAfterAck(t *testing.T) {
	for _, next := range []string{"begin", "goodbye"} {
		t.Run(next, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			mem := &gatedMem{flatMem: flatMem{b: make([]byte, 4<<20)}, open: make(chan struct{}), fail: ErrOutOfRange}
			close(mem.open)
			rcfg.Sink = &StagingSink{Dest: mem}
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 10, []byte("s")))
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1))
			if next == "begin" {
				_ = sendCheckpoint(s, 2, KindEpoch, 10, []byte("s")) // may fail as the receiver refuses it
			} else {
				require.NoError(t, s.Close())
			}
			err := waitErr(t, run)
			require.ErrorIs(t, err, ErrCommit)
			require.ErrorIs(t, err, ErrOutOfRange)
			assert.Equal(t, uint64(1), r.Committed())
			if next == "begin" {
				require.Error(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 2), "no ack of checkpoint 2")
			}
		})
	}
}
