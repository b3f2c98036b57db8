package vmm

import (
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/dirtylog"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// The machine owns dirty tracking: KVM logs the slots exactly while a
// tracker is open, a second tracker is refused meanwhile (the two would
// steal each other's bits), and after Close the next one may start.
func TestTrackDirtyOneAtATime(t *testing.T) {
	kvmtest.Require(t)
	for _, manual := range []bool{false, true} {
		m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testKernel(tinyguest.Exit(0)),
			Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: DirtyBitmap})
		require.NoError(t, err)
		defer m.Close()
		r := m.Memory().Regions()[0]
		bitmap := make([]uint64, r.BitmapWords())
		require.Error(t, m.vm.DirtyLog(r.Slot, bitmap), "no dirty log before tracking")

		tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.NoError(t, err)
		require.NoError(t, m.vm.DirtyLog(r.Slot, bitmap), "KVM logs slot %d while tracking", r.Slot)
		_, err = m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.ErrorIs(t, err, ErrDirtyTrackingBusy)
		require.NoError(t, m.vm.DirtyLog(r.Slot, bitmap), "a refused tracker leaves the first one's logging on")

		require.NoError(t, tr.Close())
		assert.Error(t, m.vm.DirtyLog(r.Slot, bitmap), "KVM still logs slot %d after Close", r.Slot)
		tr2, err := m.TrackDirty(dirtylog.Options{ManualProtect: manual})
		require.NoError(t, err, "a new tracker once the first is closed")
		require.NoError(t, tr2.Close())
	}
}

// Config.DirtyTracking: the default is "auto", which takes the bitmap; an
// unknown mode or a ring size KVM cannot take is refused before KVM is
// touched; with "ring" every vCPU maps a ring, KVM refuses the bitmap
// calls, and a tracker still comes and goes one at a time.
func TestDirtyTrackingConfig(t *testing.T) {
	kvmtest.Require(t)
	newM := func(tracking string, entries int) (*Machine, error) {
		m, err := New(Config{MemSize: 64 << 20, CPUs: 2, Kernel: testKernel(tinyguest.Exit(0)),
			Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: tracking, DirtyRingEntries: entries})
		if err == nil {
			t.Cleanup(func() { m.Close() })
		}
		return m, err
	}
	for _, bad := range []struct {
		tracking string
		entries  int
	}{{"fast", 0}, {DirtyRing, 300}, {DirtyRing, 128}} {
		_, err := newM(bad.tracking, bad.entries)
		assert.Error(t, err, "%q with %d entries", bad.tracking, bad.entries)
	}

	m, err := newM("", 0)
	require.NoError(t, err)
	assert.Equal(t, DirtyBitmap, m.DirtyTracking(), "auto")

	m, err = newM(DirtyRing, 0)
	require.NoError(t, err)
	require.Equal(t, DirtyRing, m.DirtyTracking())
	require.NoError(t, m.Start())
	require.Len(t, m.ring.rings, 2, "one ring per vCPU")
	assert.Equal(t, min(DefaultDirtyRingEntries, m.vm.CheckExtension(kvmapi.CapDirtyLogRing)/dirtyGFNSize),
		m.ring.rings[0].Entries())
	tr, err := m.TrackDirty(dirtylog.Options{ManualProtect: true})
	require.NoError(t, err)
	assert.Equal(t, "ring", tr.Source())
	r := m.Memory().Regions()[0]
	assert.ErrorIs(t, m.vm.DirtyLog(r.Slot, make([]uint64, r.BitmapWords())), unix.ENXIO,
		"KVM refuses the bitmap of a VM with rings")
	_, err = m.TrackDirty(dirtylog.Options{})
	require.ErrorIs(t, err, ErrDirtyTrackingBusy)
	require.NoError(t, tr.Close())
	tr, err = m.TrackDirty(dirtylog.Options{})
	require.NoError(t, err)
	require.NoError(t, tr.Close())
}

// A harvest that reaps and resets the rings between a vCPU's ring-full
// exit and that vCPU's own reap leaves it nothing to collect: the vCPU
// runs on (it once took that for KVM out of step and failed the machine,
// which hung a CI run), and no page goes missing: the harvests together
// report every page the guest writes. Ring-full exits need a KVM that
// stops a vCPU at a full ring (not kvm_pvm's): real KVM, in the lab.
func TestGuestDirtyRingHarvestedBeforeTheFullExit(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	const base, pages = 0x400000, 3000
	m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testKernel(tinyguest.Dirtier(base, pages, counterGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: DirtyRing, DirtyRingEntries: 1024})
	require.NoError(t, err)
	defer m.Close()
	tr, err := m.TrackDirty(dirtylog.Options{})
	require.NoError(t, err)
	defer tr.Close()

	// Every ring-full exit first meets a harvest from its own thread,
	// so that its reap always comes after a reset.
	var mu sync.Mutex
	seen := dirtylog.NewSet(m.Memory())
	raced := 0
	m.ring.beforeFull = func() {
		s, err := tr.Harvest()
		if !assert.NoError(t, err) {
			return
		}
		mu.Lock()
		seen.Or(s)
		raced++
		mu.Unlock()
	}
	require.NoError(t, m.Start())
	deadline := time.Now().Add(60 * time.Second)
	for readCounter(t, m) < 5 {
		select {
		case <-m.Done():
			_, err := m.Wait()
			t.Fatalf("the guest stopped after %d passes and %d raced harvests: %v", readCounter(t, m), raced, err)
		default:
		}
		require.True(t, time.Now().Before(deadline), "fewer than 5 passes in 60 s (%d)", readCounter(t, m))
		time.Sleep(time.Millisecond)
	}
	require.NoError(t, m.Pause())
	s, err := tr.Harvest()
	require.NoError(t, err)
	mu.Lock()
	defer mu.Unlock()
	seen.Or(s)
	assert.GreaterOrEqual(t, m.ExitCounts()[kvmapi.ExitDirtyRingFull], uint64(5), "the ring filled (3000 pages a pass, 1024 entries)")
	assert.Equal(t, m.ExitCounts()[kvmapi.ExitDirtyRingFull], uint64(raced), "a harvest before every ring-full exit's reap")
	for p := range uint64(pages) {
		require.True(t, seen.Contains(guestmem.GPA(base+p*4096)), "page %#x written every pass, in no harvest", base+p*4096)
	}
}

// A ring tracker may go seconds between harvests (an initial sync's
// pre-copy round on a loaded host): KVMs that seldom stop a vCPU at a full
// ring (kvm_pvm, which also pushes an entry for every write, filling 64k
// entries in about 0.3 s here) would have lapped the rings by then; the
// watcher reaps them on the way, and the harvest reports every page the
// guest wrote, no overflow.
func TestDirtyRingOutlastsALongGapBetweenHarvests(t *testing.T) {
	kvmtest.Require(t)
	_, err := ringGaps(t, 3, nil)
	require.NoError(t, err)
}

// ringGaps runs a 2-vCPU Dirtier of 512 pages in ring mode (tune, if not
// nil, set before it starts) and harvests after each of gaps gaps,
// requiring every page in each harvest. A gap lasts at least 2 s and
// until the guest has written enough to lap a vCPU's ring twice (the
// counter sums both vCPUs' passes, so one of them made at least half),
// whatever CPU the vCPU threads got on a loaded host. It returns how many
// ring-full exits KVM made, and the failure of a guest that stopped or of
// a harvest.
func ringGaps(t *testing.T, gaps int, tune func(*Machine)) (fullExits uint64, err error) {
	const base, pages = 0x400000, 512
	m, err := New(Config{MemSize: 64 << 20, CPUs: 2, Kernel: testKernel(tinyguest.Dirtier(base, pages, counterGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard, DirtyTracking: DirtyRing})
	require.NoError(t, err)
	defer m.Close()
	if tune != nil {
		tune(m)
	}
	tr, err := m.TrackDirty(dirtylog.Options{})
	require.NoError(t, err)
	defer tr.Close()
	require.NoError(t, m.Start())
	defer func() { fullExits = m.ExitCounts()[kvmapi.ExitDirtyRingFull] }()
	require.NotEmpty(t, m.ring.rings)
	// Two laps of one vCPU's ring, with both vCPUs counted.
	lapping := 2 * 2 * uint64(m.ring.rings[0].Entries()) / pages
	for gap := range gaps {
		start := readCounter(t, m)
		time.Sleep(2 * time.Second)
		deadline := time.Now().Add(60 * time.Second)
		for readCounter(t, m)-start < lapping {
			select {
			case <-m.Done():
				_, err := m.Wait()
				return 0, fmt.Errorf("gap %d: the guest stopped: %w", gap, err)
			case <-time.After(10 * time.Millisecond):
			}
			require.True(t, time.Now().Before(deadline), "gap %d: fewer than %d passes in 62 s (%d)", gap, lapping, readCounter(t, m)-start)
		}
		select {
		case <-m.Done():
			_, err := m.Wait()
			return 0, fmt.Errorf("gap %d: the guest stopped: %w", gap, err)
		default:
		}
		passes := readCounter(t, m) - start
		s, err := tr.Harvest()
		t.Logf("gap %d: %d passes, %d ring-full exits so far", gap, passes, m.ExitCounts()[kvmapi.ExitDirtyRingFull])
		if err != nil {
			return 0, fmt.Errorf("gap %d: harvest after a gap of %d passes of %d pages: %w", gap, passes, pages, err)
		}
		for p := range uint64(pages) {
			require.True(t, s.Contains(guestmem.GPA(base+p*4096)), "gap %d: page %#x, written every pass, not reported", gap, base+p*4096)
		}
	}
	return 0, nil
}

// On kvm_pvm, which stops a vCPU at a full ring only now and then (a
// guest that runs without exits laps it first), each vCPU thread reaps
// the rings on its own CPU clock (cputimer.go): with the watcher's
// goroutine left out, a guest that rewrites 512 pages still loses no
// entry over gaps between harvests long enough to lap a ring twice.
// Without either, the same guest laps its ring, which the next reap
// reports (the hazard both guard against is real here), unless KVM
// stopped the vCPUs in time that run: on a loaded host (a clean-clone CI
// run on 2026-12-07) a vCPU preempted often meets KVM's check at each
// entry, and the ring-full exits reap, losing nothing either.
func TestDirtyRingVCPUsReapOnTheirOwnClock(t *testing.T) {
	kvmtest.Require(t)
	if !kvmapi.IsPVM() {
		t.Skip("a KVM that stops a vCPU on a full ring needs no ticks (ring-full exits: TestGuestDirtyRingHarvestedBeforeTheFullExit)")
	}
	run := func(t *testing.T, ticks bool) (uint64, error) {
		return ringGaps(t, 2, func(m *Machine) { m.ring.noWatcher, m.ring.noTicks = true, !ticks })
	}
	t.Run("ticks", func(t *testing.T) {
		_, err := run(t, true)
		assert.NoError(t, err)
	})
	t.Run("neither", func(t *testing.T) {
		fullExits, err := run(t, false)
		if err == nil {
			t.Logf("no ring lapped: KVM stopped the vCPUs %d times at a full ring, and those exits reaped", fullExits)
			assert.Positive(t, fullExits, "two laps' worth of writes, nothing reaped them, and no overflow reported")
			return
		}
		assert.ErrorIs(t, err, ErrDirtyRingOverflow)
	})
}
