package replicate

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/vmm/guestmem"
)

// Copying on write with 1 ms epochs, a vCPU (the Dirtier, through KVM)
// and a device-like goroutine (WriteAt, as the virtio used ring: a
// virtqueue's avail ring, which the guest writes, shares its page) write
// the same pages all the time, racing with every Arm. The guest, the
// writer and the checkpoints go on, second after second: a page left
// protected after a fault held its vCPU in KVM_RUN for good (kicks do not
// end that wait) and the next pause with it, the guest's output held
// (the lab's real-guest hang with copy-on-write); a WriteAt that faulted
// in user mode could starve the fault handler.
//
// And with --checkpoint-copy auto, the guest's dirty set flipping between
// 16 and 128 pages every 2 ms about a threshold of 64 (the writer on 8
// pages): checkpoints switch between stopping to copy (armed pages let go
// after the pause) and copying on write (unarmed, or armed after a
// copy-on-write one) all the time, the writer racing with each Disarm.
func TestCoWWritersRaceWithArming(t *testing.T) {
	for _, m := range []CopyMode{CopyCoW, CopyAuto} {
		t.Run(string(m), func(t *testing.T) { testCoWWritersRace(t, m) })
	}
}

func testCoWWritersRace(t *testing.T, copyMode CopyMode) {
	kvmtest.Require(t)
	pages := uint64(64)
	code := tinyguest.Dirtier(dirtyBase, uint32(pages), passGPA)
	if copyMode == CopyAuto {
		pages, code = 8, stepGuest()
	}
	prim := newTiny(t, code)
	require.NoError(t, prim.Memory().WriteAt(binary.LittleEndian.AppendUint32(nil, 16), stepGPA))
	require.NoError(t, prim.Start())
	sb := newStandby(t, nil)
	receive(t, sb)
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: newProxy(t, sb.Addr()).addr(), Insecure: true,
		Name: "tiny", Epoch: time.Millisecond, FailoverTimeout: 10 * time.Second, Copy: copyMode, CoWPages: 64}, testHooks{})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes atomic.Uint64
	if copyMode == CopyAuto {
		wg.Add(1)
		go func() { // the dirty set flips
			defer wg.Done()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-time.After(2 * time.Millisecond):
				}
				v := uint32(16)
				if n%2 == 0 {
					v = 128
				}
				if err := prim.Memory().WriteAt(binary.LittleEndian.AppendUint32(nil, v), stepGPA); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		var b [8]byte
		for n := uint64(0); ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			binary.LittleEndian.PutUint64(b[:], n)
			if err := prim.Memory().WriteAt(b[:], guestmem.GPA(dirtyBase+(n%pages)*guestmem.PageSize+64)); err != nil {
				t.Error(err)
				return
			}
			writes.Add(1)
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
	}()

	var stalled string
	lastEpochs, lastPasses, lastWrites := rep.Stats().Epochs, passes(t, prim), writes.Load()
	// The scenario: four seconds of racing; with auto, on until it has
	// switched ten times each way (a loaded host runs fewer epochs a
	// second), for 20 s at most.
	more := func(s int) bool {
		sw := copySwitches(rep.Recent())
		return s < 4 || copyMode == CopyAuto && s < 20 && (sw[0] < 10 || sw[1] < 10)
	}
	for s := 0; more(s) && stalled == ""; s++ {
		time.Sleep(time.Second)
		e, p, w := rep.Stats().Epochs, passes(t, prim), writes.Load()
		switch {
		case e == lastEpochs:
			stalled = "the checkpoints"
		case p == lastPasses:
			stalled = "the guest"
		case w == lastWrites:
			stalled = "the writer"
		}
		lastEpochs, lastPasses, lastWrites = e, p, w
	}
	if stalled != "" {
		// Where each thread waits (a vCPU in handle_userfault: held by a
		// fault), then let everything through, so that the test ends.
		t.Logf("threads' kernel waits: %s", threadWaits())
		_ = rep.cow.Close()
	}
	require.Empty(t, stalled, "stopped for a second (cow: %+v)", rep.cow.Stats())
	st := rep.cow.Stats()
	require.Positive(t, st.ArmedWrites, "armed pages were written before the cut")
	require.Positive(t, st.Faults+st.VMMWrites, "pages were copied before a write")
	t.Logf("%d epochs, %d guest passes, %d writes; %+v", lastEpochs, lastPasses, lastWrites, st)
	if copyMode == CopyAuto {
		recent := rep.Recent()
		switches := copySwitches(recent)
		t.Logf("of the last %d checkpoints: %d switches to copy-on-write, %d to stop-and-copy", len(recent), switches[0], switches[1])
		require.GreaterOrEqual(t, switches[0], 10, "checkpoints switch to copy-on-write")
		require.GreaterOrEqual(t, switches[1], 10, "checkpoints switch to stop-and-copy")
	}
}

// copySwitches counts the checkpoints that copied otherwise than the one
// before: [0] switches to copy-on-write, [1] to stop-and-copy.
func copySwitches(recent []EpochStats) [2]int {
	var switches [2]int
	for i := 1; i < len(recent); i++ {
		if a, b := recent[i-1].CopyMode, recent[i].CopyMode; a != b {
			switches[map[bool]int{true: 0, false: 1}[b == string(CopyCoW)]]++
		}
	}
	return switches
}

// threadWaits lists this process's threads and where in the kernel each
// waits (/proc/self/task/*/wchan).
func threadWaits() string {
	dirs, _ := filepath.Glob("/proc/self/task/*")
	var b strings.Builder
	for _, d := range dirs {
		w, _ := os.ReadFile(filepath.Join(d, "wchan"))
		fmt.Fprintf(&b, " %s:%s", filepath.Base(d), w)
		if string(w) == "handle_userfault" {
			// Root only: the kernel stack says whether it is KVM_RUN's.
			if st, err := os.ReadFile(filepath.Join(d, "stack")); err == nil {
				fmt.Fprintf(&b, " [%s]", strings.Join(strings.Fields(string(st)), " "))
			}
		}
	}
	return b.String()
}
