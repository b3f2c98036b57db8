package guestmem

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// Writers that race with Arm and Begin round after round, as a device
// and a vCPU race with the replicator's arming while the guest runs:
// WriteAt on pages of the set (the virtio used ring, a block status
// byte), and writes by the kernel on the process's behalf (a read(2)
// into guest memory: how KVM writes on a vCPU's behalf, its fault held
// in the kernel) to other pages of the set and to the pages WriteAt
// writes (a virtqueue's avail ring shares a page with its used ring).
// Every writer must keep going: a page the handler wakes but leaves
// protected holds its writer for good, and pauses the machine for good
// in a replicator (the pause waits for the vCPU). And WriteAt must never
// fault: a goroutine held by a fault in user mode cannot be preempted,
// so a garbage collection would wait for it while the handler waits for
// the collection.
func TestArmRacesWithWriters(t *testing.T) {
	t.Run("WriteAt", func(t *testing.T) { armRace(t, false) })
	t.Run("WriteAt and the kernel", func(t *testing.T) { armRace(t, true) })
}

// armRace runs Arm, Begin and the copy round after round for 3 s while
// two goroutines WriteAt pages of the set and, with kernel, two more have
// the kernel write them and others.
func armRace(t *testing.T, kernel bool) {
	// A collection while a goroutine is held in user mode would hang the
	// test binary rather than fail this test: no collections here; and
	// enough Ps for the fault handler and the watchdog with both WriteAt
	// goroutines held.
	faultsHoldGoroutines(t, 4)
	const pages = 64
	m, err := New([]Spec{{GPA: 0, Size: pages * PageSize}})
	require.NoError(t, err)
	defer m.Close()
	host := m.Regions()[0].Host
	for pg := range pages {
		host[pg*PageSize] = 1
	}
	p, err := NewProtector(m)
	require.NoError(t, err)
	defer p.Close()
	set := newSet(m)
	for pg := range 16 {
		set.add(m, GPA(pg*PageSize))
	}
	dst := make([]byte, 16*PageSize)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var progress [4]atomic.Uint64
	var pipes [][2]int
	writer := func(i int, write func(n uint64) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(0); ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := write(n); err != nil {
					t.Errorf("writer %d: %v", i, err)
					return
				}
				progress[i].Add(1)
			}
		}()
	}
	for i := range 2 { // WriteAt: pages 0..3 and 8..11
		writer(i, func(n uint64) error {
			var b [8]byte
			b[0] = byte(n)
			return m.WriteAt(b[:], GPA((uint64(i)*8+n%4)*PageSize+64))
		})
	}
	for i := 2; i < 4 && kernel; i++ { // the kernel: pages 0..15, beside WriteAt's bytes
		var fds [2]int
		require.NoError(t, unix.Pipe2(fds[:], unix.O_CLOEXEC))
		pipes = append(pipes, fds)
		writer(i, func(n uint64) error {
			if _, err := unix.Write(fds[1], []byte{byte(n)}); err != nil {
				return err
			}
			off := (n%16)*PageSize + 128 + uint64(i)
			_, err := unix.Read(fds[0], host[off:off+1])
			return err
		})
	}
	defer func() {
		for _, fds := range pipes {
			unix.Close(fds[0])
			unix.Close(fds[1])
		}
	}()

	// The watchdog: every writer advances every few seconds, or the test
	// fails, and all of guest memory is un-protected (again and again) to
	// free the writers and whatever waits on them.
	var stalled atomic.Pointer[string]
	done := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		var last [4]uint64
		for {
			select {
			case <-done:
				return
			case <-time.After(3 * time.Second): // polling the writers' progress
			}
			for i := range progress {
				if i >= 2 && !kernel {
					break
				}
				n := progress[i].Load()
				if n == last[i] && stalled.Load() == nil {
					why := fmt.Sprintf("writer %d held on a fault for 3s", i)
					stalled.Store(&why)
				}
				last[i] = n
			}
			if stalled.Load() != nil {
				_ = p.u.protect(p.bases[0], uintptr(pages*PageSize), false, false)
			}
		}
	}()

	rounds := 0
	for start := time.Now(); time.Since(start) < 3*time.Second && stalled.Load() == nil; rounds++ {
		require.NoError(t, p.Arm(nil))
		s, err := p.Begin(set, dst)
		require.NoError(t, err)
		go s.Copy()
		_, err = s.Wait()
		require.NoError(t, err)
	}
	close(stop)
	wg.Wait()
	close(done)
	<-watched
	reported := p.reported.Load()
	require.NoError(t, p.Close())
	why := ""
	if w := stalled.Load(); w != nil {
		why = *w
	}
	require.Empty(t, why, "after %d rounds", rounds)
	if !kernel {
		require.Zero(t, reported, "WriteAt faulted (%d rounds)", rounds)
	}
	for i := range progress {
		if i >= 2 && !kernel {
			break
		}
		require.NotZero(t, progress[i].Load(), "writer %d wrote", i)
	}
	t.Logf("%d rounds; writes: WriteAt %d, %d; kernel %d, %d; %+v; reported faults %d", rounds,
		progress[0].Load(), progress[1].Load(), progress[2].Load(), progress[3].Load(), p.Stats(), reported)
}
