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
func TestCoWWritersRaceWithArming(t *testing.T) {
	kvmtest.Require(t)
	const pages = 64
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, pages, passGPA))
	require.NoError(t, prim.Start())
	sb := newStandby(t, nil)
	receive(t, sb)
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: newProxy(t, sb.Addr()).addr(), Insecure: true,
		Name: "tiny", Epoch: time.Millisecond, FailoverTimeout: 10 * time.Second, Copy: CopyCoW}, testHooks{})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes atomic.Uint64
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
	for s := 0; s < 4 && stalled == ""; s++ {
		time.Sleep(time.Second) // the scenario: a second of racing
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
