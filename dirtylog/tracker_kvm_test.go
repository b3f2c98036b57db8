package dirtylog_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/dirtylog"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/kvmapi"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// The tracker is driven through vmm.Machine.TrackDirty, as the replication
// code does: only vmm holds the VM's file descriptor.
type (
	Options = dirtylog.Options
	Tracker = dirtylog.Tracker
	Set     = dirtylog.Set
)

var NewSet = dirtylog.NewSet

const pg = guestmem.PageSize

// The dirtier guests write one byte in each page of [dirtyBase,
// dirtyBase+n pages) and bump a pass counter at counterAddr. dirtyBase is
// page 1008, so a 37-page range crosses a 64-page bitmap word.
const (
	dirtyBase   = 0x3f0000
	counterAddr = 0x8000
)

// modes runs fn once with plain KVM_GET_DIRTY_LOG and once with manual
// protection (which falls back to plain when KVM lacks it; the subtest
// checks which one it got).
func modes(t *testing.T, fn func(t *testing.T, opts Options)) {
	for _, m := range []struct {
		name string
		opts Options
	}{
		{"get", Options{}},
		{"manual-protect", Options{ManualProtect: true}},
	} {
		t.Run(m.name, func(t *testing.T) { fn(t, m.opts) })
	}
}

// newMachine builds a machine on real KVM running code (not started).
func newMachine(tb testing.TB, memSize uint64, code []byte) *vmm.Machine {
	tb.Helper()
	kvmtest.Require(tb)
	m, err := vmm.New(vmm.Config{MemSize: memSize, CPUs: 1, Kernel: tinyguest.Kernel(code),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
	require.NoError(tb, err)
	tb.Cleanup(func() {
		m.Stop()
		_, _ = m.Wait()
		m.Close()
	})
	return m
}

func newTracker(tb testing.TB, m *vmm.Machine, opts Options) *Tracker {
	tb.Helper()
	tr, err := m.TrackDirty(opts)
	require.NoError(tb, err)
	tb.Cleanup(func() { assert.NoError(tb, tr.Close()) })
	if opts.ManualProtect {
		require.Equal(tb, hasManualProtect(tb), tr.ManualProtect(), "manual protect in use exactly when KVM has it")
	} else {
		require.False(tb, tr.ManualProtect())
	}
	return tr
}

func passes(tb testing.TB, m *vmm.Machine) uint64 {
	tb.Helper()
	b, err := m.Memory().Slice(counterAddr, 8)
	require.NoError(tb, err)
	return binary.LittleEndian.Uint64(b)
}

// waitPasses waits until the dirtier has finished at least n more passes
// than when called; so every page of its range was written after the call.
func waitPasses(tb testing.TB, m *vmm.Machine, n uint64) {
	tb.Helper()
	start := passes(tb, m)
	deadline := time.Now().Add(60 * time.Second)
	for passes(tb, m) < start+n+1 {
		if time.Now().After(deadline) {
			tb.Fatalf("dirtier made %d passes in 60s, want %d", passes(tb, m)-start, n+1)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

var (
	dirtier     = tinyguest.Dirtier
	dirtierPass = tinyguest.DirtierPass
)

// finiteDirtier is dirtier that stops writing after passes passes and
// spins: the last write to each page is final, so a harvest that misses
// it is never made good by a later pass.
//
//	       (one pass of dirtier)
//	       cmp qword [counter], passes
//	       jb again
//	spin:  jmp spin
func finiteDirtier(base uint64, pages uint32, counter uint32, passes uint8) []byte {
	code := dirtierPass(base, pages, counter)
	code = append(code, 0x48, 0x83, 0x3c, 0x25)
	code = binary.LittleEndian.AppendUint32(code, counter)
	code = append(code, passes)
	code = append(code, 0x72, byte(-(len(code) + 2)))
	return append(code, 0xeb, 0xfe)
}

func pagesOf(s *Set) []guestmem.GPA {
	var out []guestmem.GPA
	_ = s.ForEach(func(g guestmem.GPA) error { out = append(out, g); return nil })
	return out
}

// dirtierPages is the exact set a dirtier of n pages writes: its range and
// its counter, in ascending order.
func dirtierPages(n int) []guestmem.GPA {
	out := []guestmem.GPA{counterAddr}
	for i := range n {
		out = append(out, dirtyBase+guestmem.GPA(i*pg))
	}
	return out
}

// A paused harvest reports exactly the pages the guest wrote since the last
// one: its range and its counter (its code reads but never writes, and it
// uses no stack). Pages written again after a harvest are reported again,
// which shows that the harvest re-armed write protection.
func TestHarvestGuestWrites(t *testing.T) {
	modes(t, func(t *testing.T, opts Options) {
		const n = 37
		m := newMachine(t, 64<<20, dirtier(dirtyBase, n, counterAddr))
		require.NoError(t, m.Start())
		waitPasses(t, m, 1) // let boot-time writes (page-table A/D bits) settle
		tr := newTracker(t, m, opts)

		for round := range 3 {
			waitPasses(t, m, 1)
			require.NoError(t, m.Pause())
			s, err := tr.Harvest()
			require.NoError(t, err)
			for _, g := range dirtierPages(n)[1:] {
				b, err := m.Memory().Slice(g, 1)
				require.NoError(t, err)
				require.NotZero(t, b[0], "the guest never wrote page %#x", uint64(g))
			}
			assert.Equal(t, dirtierPages(n), pagesOf(s), "round %d", round)
			assert.Equal(t, n+1, s.Count())

			again, err := tr.Harvest()
			require.NoError(t, err)
			assert.Zero(t, again.Count(), "round %d: a second harvest while paused: %#x", round, pagesOf(again))
			require.NoError(t, m.Resume())
		}
	})
}

// The VMM's own writes reach the harvest with no vCPU running at all: KVM
// never sees them, guestmem's bitmap does.
func TestHarvestVMMWrites(t *testing.T) {
	modes(t, func(t *testing.T, opts Options) {
		m := newMachine(t, 64<<20, tinyguest.Exit(0)) // never started
		mem := m.Memory()
		require.NoError(t, mem.WriteAt([]byte("before New is forgotten"), 0x700000))
		tr := newTracker(t, m, opts)

		require.NoError(t, mem.WriteAt([]byte{1}, 0x200000))
		require.NoError(t, mem.WriteAt(make([]byte, 2), 0x300fff)) // straddles two pages
		require.NoError(t, mem.MarkDirty(0x3ff0000, 1))            // last 64 KiB of memory
		require.NoError(t, mem.Fill(0x500000, 3*pg, func(buf []byte) error { buf[0] = 1; return nil }))
		s, err := tr.Harvest()
		require.NoError(t, err)
		assert.Equal(t, []guestmem.GPA{0x200000, 0x300000, 0x301000, 0x500000, 0x501000, 0x502000, 0x3ff0000},
			pagesOf(s))

		again, err := tr.Harvest()
		require.NoError(t, err)
		assert.Zero(t, again.Count())
	})
}

// Harvesting while the guest runs and a device writes loses nothing: a
// shadow copy that starts as a full copy taken after New and then copies
// only the pages each harvest reports (read after the harvest, as the
// replication code does) equals guest memory at the end, page by page.
// This is DESIGN.md invariant 3 at the level of this package. The guest
// stops writing after a few passes while the harvests go on, so a harvest
// that dropped a page is not papered over by a later pass.
func TestHarvestWhileRunningLosesNothing(t *testing.T) {
	modes(t, func(t *testing.T, opts Options) {
		const n, total = 4000, 3
		m := newMachine(t, 64<<20, finiteDirtier(dirtyBase, n, counterAddr, total))
		mem := m.Memory()
		// Before Start: loading the kernel is a VMM write the harvests
		// must report too.
		tr := newTracker(t, m, opts)

		shadow := map[guestmem.GPA][]byte{}
		for _, r := range mem.Regions() {
			shadow[r.GPA] = bytes.Clone(r.Host)
		}
		copyPage := func(gpa guestmem.GPA) error {
			for _, r := range mem.Regions() {
				if gpa >= r.GPA && gpa < r.End() {
					off := gpa - r.GPA
					copy(shadow[r.GPA][off:off+pg], r.Host[off:off+pg])
					return nil
				}
			}
			return fmt.Errorf("harvest reported %#x outside memory", uint64(gpa))
		}

		// A device writing guest memory at the same time, elsewhere.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(1, 2))
			var v [8]byte
			for i := uint64(0); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				binary.LittleEndian.PutUint64(v[:], i)
				gpa := 0x2000000 + guestmem.GPA(rng.IntN(1024))*pg + guestmem.GPA(rng.IntN(pg-8))
				if err := mem.WriteAt(v[:], gpa); err != nil {
					panic(err) // a test bug, not a guest input
				}
			}
		}()

		require.NoError(t, m.Start())
		union := NewSet(mem)
		harvest := func() {
			s, err := tr.Harvest()
			require.NoError(t, err)
			require.NoError(t, s.ForEach(copyPage))
			union.Or(s)
		}
		harvests := 0
		deadline := time.Now().Add(60 * time.Second)
		for ; passes(t, m) < total; harvests++ {
			require.True(t, time.Now().Before(deadline), "the guest made %d of %d passes in 60s", passes(t, m), total)
			harvest()
		}
		for range 10 { // the guest spins now; the device still writes
			harvest()
		}
		close(stop)
		wg.Wait()
		require.NoError(t, m.Pause())
		harvest()
		t.Logf("%d harvests during %d passes", harvests, total)

		for _, g := range dirtierPages(n) {
			assert.True(t, union.Contains(g), "page %#x written by the guest never harvested", uint64(g))
		}
		for _, r := range mem.Regions() {
			sh := shadow[r.GPA]
			var bad []string
			for off := uint64(0); off < r.Size; off += pg {
				if !bytes.Equal(sh[off:off+pg], r.Host[off:off+pg]) {
					bad = append(bad, fmt.Sprintf("%#x", uint64(r.GPA)+off))
				}
			}
			assert.Empty(t, bad, "pages that differ from the shadow copy (written but never harvested)")
		}
	})
}

// Close ends tracking: Harvest says so, Close is idempotent, and a new
// tracker can take over the same machine (vmm's tests check that KVM's
// logging is off in between).
func TestCloseThenTrackAgain(t *testing.T) {
	modes(t, func(t *testing.T, opts Options) {
		m := newMachine(t, 64<<20, tinyguest.Exit(0))
		tr, err := m.TrackDirty(opts)
		require.NoError(t, err)
		require.NoError(t, tr.Close())
		_, err = tr.Harvest()
		require.ErrorIs(t, err, dirtylog.ErrClosed)
		assert.NoError(t, tr.Close())

		tr2 := newTracker(t, m, opts)
		require.NoError(t, m.Memory().WriteAt([]byte{1}, 0x10000))
		s, err := tr2.Harvest()
		require.NoError(t, err)
		assert.Equal(t, []guestmem.GPA{0x10000}, pagesOf(s))
	})
}

// hasManualProtect asks KVM directly (a VM of its own) whether it offers
// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
func hasManualProtect(tb testing.TB) bool {
	tb.Helper()
	sys, err := kvmapi.Open("/dev/kvm")
	require.NoError(tb, err)
	defer sys.Close()
	vm, err := sys.CreateVM()
	require.NoError(tb, err)
	defer vm.Close()
	return vm.CheckExtension(kvmapi.CapManualDirtyLogProtect2)&1 != 0
}

// BenchmarkHarvest measures one Harvest of a paused 256 MiB guest: "guest"
// after the vCPU wrote 1024 pages (what a checkpoint pays), "vmm" after
// the VMM wrote 1024 pages, "clean" with nothing to report.
func BenchmarkHarvest(b *testing.B) {
	const n = 1024
	for _, mode := range []struct {
		name string
		opts Options
	}{{"get", Options{}}, {"manual-protect", Options{ManualProtect: true}}} {
		b.Run(mode.name, func(b *testing.B) {
			m := newMachine(b, 256<<20, dirtier(0x1000000, n, counterAddr))
			require.NoError(b, m.Start())
			tr := newTracker(b, m, mode.opts)
			waitPasses(b, m, 1)
			require.NoError(b, m.Pause())

			harvest := func(b *testing.B, dirty func()) {
				pages := 0
				b.ResetTimer()
				for range b.N {
					b.StopTimer()
					dirty()
					b.StartTimer()
					s, err := tr.Harvest()
					if err != nil {
						b.Fatal(err)
					}
					pages = s.Count()
				}
				b.ReportMetric(float64(pages), "pages/op")
			}
			b.Run("guest-1k", func(b *testing.B) {
				harvest(b, func() {
					require.NoError(b, m.Resume())
					waitPasses(b, m, 1)
					require.NoError(b, m.Pause())
				})
			})
			b.Run("vmm-1k", func(b *testing.B) {
				one := []byte{1}
				harvest(b, func() {
					for i := range n {
						_ = m.Memory().WriteAt(one, 0x2000000+guestmem.GPA(i)*pg)
					}
				})
			})
			b.Run("clean", func(b *testing.B) { harvest(b, func() {}) })
		})
	}
}

// BenchmarkHarvestClean measures how a harvest with nothing to report grows
// with guest size: the bitmap scan is the part a dirty ring would avoid.
func BenchmarkHarvestClean(b *testing.B) {
	for _, size := range []uint64{256 << 20, 4 << 30, 16 << 30} {
		b.Run(fmt.Sprintf("%dMiB", size>>20), func(b *testing.B) {
			m := newMachine(b, size, tinyguest.Exit(0)) // never started
			tr := newTracker(b, m, Options{ManualProtect: true})
			b.ResetTimer()
			for range b.N {
				if _, err := tr.Harvest(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
