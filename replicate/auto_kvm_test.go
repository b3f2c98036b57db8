package replicate

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// With --checkpoint-copy auto, a guest whose dirty set steps small →
// large → small is checkpointed with the guest stopped, then copying on
// write, then stopped again, each checkpoint as its own dirty set says
// (CoWPages); and the standby's memory equals the primary's at the cut,
// page by page, at every checkpoint compared, those next to each switch
// included. While the guest stays small after copying on write, no page
// of guest memory is left write-protected (the kernel's own page table
// says so: /proc/self/pagemap), where during the copy-on-write phase
// protected pages are seen.
func TestAutoCopySwitchesWithTheDirtySet(t *testing.T) {
	kvmtest.Require(t)
	const (
		threshold = 256
		small     = 16
		large     = 2048
	)
	prim := newTiny(t, stepGuest())
	require.NoError(t, prim.Memory().WriteAt(binary.LittleEndian.AppendUint32(nil, small), stepGPA))
	require.NoError(t, prim.Start())
	rec := &cutRecorder{m: prim, cuts: map[uint64][]byte{}}
	// The step is written in the pause, once the cut is recorded: the
	// write belongs to the next epoch. (Written while the guest runs, it
	// could land before a cut and be marked dirty after that cut's
	// harvest, which only a quiesced device is kept from doing.)
	var step atomic.Int64
	step.Store(-1)
	setPages := func(n uint32) { step.Store(int64(n)) }
	atCut := func(e uint64) {
		rec.at(e)
		if n := step.Swap(-1); n >= 0 {
			if err := prim.Memory().WriteAt(binary.LittleEndian.AppendUint32(nil, uint32(n)), stepGPA); err != nil {
				t.Error(err)
			}
		}
	}

	// The standby checks its memory at each commit: by then it holds the
	// previous checkpoint (this one's pages are staged until after the
	// hook), which must equal the primary's memory at that cut.
	var (
		replica  atomic.Pointer[vmm.Machine]
		mu       sync.Mutex
		prev     uint64
		compared = map[uint64]int{} // epoch → pages that differ
		diffs    []string           // the first few
		missing  int                // cuts not recorded any more
	)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, FailoverTimeout: 10 * time.Second,
		Build: func(id stream.Identity) (Replica, error) {
			m, err := vmm.New(vmm.Config{MemSize: MemSize(id), CPUs: int(id.VCPUs), Console: io.Discard})
			replica.Store(m)
			return Replica{Machine: m}, err
		}})
	require.NoError(t, err)
	t.Cleanup(func() { sb.Close() })
	sb.onCheckpoint = func(e uint64) {
		mu.Lock()
		defer mu.Unlock()
		if prev != 0 {
			want := rec.get(prev)
			if want == nil {
				missing++
			} else {
				got := replica.Load().Memory().Regions()[0].Host
				differ := 0
				for off := 0; off < len(got); off += guestmem.PageSize {
					if !bytes.Equal(got[off:off+guestmem.PageSize], want[off:off+guestmem.PageSize]) {
						differ++
						if len(diffs) < 10 {
							diffs = append(diffs, fmt.Sprintf("epoch %d: page %#x", prev, off))
						}
					}
				}
				compared[prev] = differ
			}
		}
		prev = e
	}
	receive(t, sb)

	// Copy left empty: auto is the default.
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second, CoWPages: threshold}, testHooks{atCut: atCut})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.NotNil(t, rep.cow, "this host offers copy-on-write")

	// modes counts the recorded epochs after epoch from by copy mode.
	modes := func(from uint64) (stop, cow int) {
		for _, es := range rep.Recent() {
			if es.Epoch > from {
				if es.CopyMode == string(CopyCoW) {
					cow++
				} else {
					stop++
				}
			}
		}
		return stop, cow
	}
	require.Eventually(t, func() bool { s, _ := modes(0); return s >= 8 }, 30*time.Second, time.Millisecond)
	up := rep.Stats().Epoch
	setPages(large)
	require.Eventually(t, func() bool { _, c := modes(up); return c >= 8 }, 30*time.Second, time.Millisecond,
		"%d dirty pages a pass copy on write", large)
	require.Eventually(t, func() bool { return writeProtectedPages(t, prim) > 0 }, 30*time.Second, time.Millisecond,
		"copying on write, pages are seen write-protected (armed or not yet copied)")
	down := rep.Stats().Epoch
	setPages(small)
	require.Eventually(t, func() bool { s, _ := modes(down + 2); return s >= 8 }, 30*time.Second, time.Millisecond,
		"%d dirty pages a pass stop to copy again", small)
	// Stopping to copy, nothing is armed: no page of guest memory is
	// write-protected, epoch after epoch.
	for i := 0; i < 5; i++ {
		e := rep.Stats().Epochs
		require.Eventually(t, func() bool { return rep.Stats().Epochs > e }, 30*time.Second, time.Millisecond)
		require.Zero(t, writeProtectedPages(t, prim), "pages left write-protected while checkpoints stop to copy")
	}
	// The next commit checks the last of these.
	last := rep.Stats().Epoch
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return prev > last }, 30*time.Second, time.Millisecond)

	mu.Lock()
	defer mu.Unlock()
	var b strings.Builder
	var switches [2]int // checked: cow after stop, stop after cow
	prevMode := ""
	for _, es := range rep.Recent() {
		want := string(CopyStop)
		if es.DirtyPages >= threshold {
			want = string(CopyCoW)
		}
		require.Equal(t, want, es.CopyMode, "epoch %d: %d dirty pages", es.Epoch, es.DirtyPages)
		differ, ok := compared[es.Epoch]
		if ok {
			require.Zero(t, differ, "epoch %d (%s): pages of the standby that differ from the primary's at the cut: %v", es.Epoch, es.CopyMode, diffs)
			if prevMode == string(CopyStop) && es.CopyMode == string(CopyCoW) {
				switches[0]++
			}
			if prevMode == string(CopyCoW) && es.CopyMode == string(CopyStop) {
				switches[1]++
			}
		}
		prevMode = es.CopyMode
		fmt.Fprintf(&b, "\n%d\t%s\t%d\t%v\t%v\t%v", es.Epoch, es.CopyMode, es.DirtyPages, es.Pause.Round(10*time.Microsecond),
			es.AckTime.Round(10*time.Microsecond), ok)
	}
	t.Logf("small from epoch 1, large from %d, small again from %d; %d cuts compared, %d not recorded any more\nepoch\tcopy\tdirty\tpause\tack\tcompared%s",
		up+1, down+1, len(compared), missing, b.String())
	require.Positive(t, switches[0], "a copy-on-write checkpoint right after a stopped one is compared page by page")
	require.Positive(t, switches[1], "a stopped checkpoint right after a copy-on-write one is compared page by page")
	st := rep.Stats()
	require.NotZero(t, st.CoWEpochs)
	require.Less(t, st.CoWEpochs, st.Epochs)
}

// writeProtectedPages counts the pages of m's guest memory that
// userfaultfd write-protects now: bit 57 (PM_UFFD_WP) of their entries in
// /proc/self/pagemap.
func writeProtectedPages(t *testing.T, m *vmm.Machine) int {
	t.Helper()
	f, err := os.Open("/proc/self/pagemap")
	require.NoError(t, err)
	defer f.Close()
	n := 0
	for _, r := range m.Memory().Regions() {
		addr := reflect.ValueOf(r.Host).Pointer() // the region's first byte
		buf := make([]byte, r.Pages()*8)
		_, err := f.ReadAt(buf, int64(addr/guestmem.PageSize*8))
		require.NoError(t, err)
		for off := 0; off < len(buf); off += 8 {
			if binary.LittleEndian.Uint64(buf[off:])&(1<<57) != 0 {
				n++
			}
		}
	}
	return n
}
