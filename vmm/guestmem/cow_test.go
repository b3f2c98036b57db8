package guestmem

import (
	"bytes"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// fillPage stamps page i of a region with v, byte by byte: plain stores,
// which stay preemptible while they wait on a write fault (the test's
// goroutines write protected memory directly, as a vCPU would).
func fillPage(b []byte, v byte) {
	for k := range b {
		b[k] = v
	}
}

// A snapshot holds every page as it was at Begin while writers change
// them during the copy: some pages are written before the copier starts
// (each write waits on the fault handler, which copies the page first),
// some while it runs, some through WriteAt (which copies first and never
// faults); afterwards the snapshot holds the old bytes and memory the new
// ones, and nothing is left protected.
func TestSnapshotHoldsMemoryAsOfBegin(t *testing.T) {
	const pages = 2048
	m, err := New([]Spec{{GPA: 0, Size: pages * PageSize}, {GPA: 0x10000000, Size: 64 * PageSize}})
	require.NoError(t, err)
	defer m.Close()
	regions := m.Regions()
	for p := 0; p < pages; p++ {
		fillPage(regions[0].Host[p*PageSize:(p+1)*PageSize], byte(p))
	}
	for p := 0; p < 64; p++ {
		fillPage(regions[1].Host[p*PageSize:(p+1)*PageSize], 0xA0)
	}
	// Every other run of 8 pages, and all of the second region.
	var gpas []GPA
	for p := 0; p < pages; p++ {
		if p/8%2 == 0 {
			gpas = append(gpas, GPA(p*PageSize))
		}
	}
	for p := 0; p < 64; p++ {
		gpas = append(gpas, regions[1].GPA+GPA(p*PageSize))
	}
	want := make([]byte, len(gpas)*PageSize)
	for i, g := range gpas {
		require.NoError(t, m.ReadAt(want[i*PageSize:(i+1)*PageSize], g))
	}

	p, err := NewProtector(m)
	require.NoError(t, err)
	defer p.Close()
	for round := 0; round < 3; round++ {
		dst := make([]byte, len(gpas)*PageSize)
		s, err := p.Begin(gpas, dst)
		require.NoError(t, err)
		require.Less(t, s.Protects(), len(gpas)/4, "runs of pages are protected in one call")
		newVal := byte(0x50 + round)
		host := regions[0].Host
		// Before the copier: the last pages of the first region, directly
		// (each write faults), and the second region through WriteAt.
		for p := pages - 64; p < pages; p++ {
			fillPage(host[p*PageSize:(p+1)*PageSize], newVal)
		}
		buf := bytes.Repeat([]byte{newVal}, 3*PageSize)
		require.NoError(t, m.WriteAt(buf, regions[1].GPA+PageSize))
		// During the copy: writers from both ends.
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			for p := 0; p < pages/2; p++ {
				fillPage(host[p*PageSize:(p+1)*PageSize], newVal)
			}
		}()
		go func() {
			defer wg.Done()
			for p := pages - 65; p >= pages/2; p-- {
				fillPage(host[p*PageSize:(p+1)*PageSize], newVal)
			}
		}()
		go s.Copy()
		for i := range gpas {
			page, err := s.Page(i)
			require.NoError(t, err)
			require.True(t, bytes.Equal(want[i*PageSize:(i+1)*PageSize], page), "page %#x as of Begin", uint64(gpas[i]))
		}
		_, err = s.Wait()
		require.NoError(t, err)
		wg.Wait()
		require.True(t, bytes.Equal(want, dst), "the snapshot holds memory as of Begin")
		for p := 0; p < pages; p++ {
			require.Equal(t, newVal, host[p*PageSize], "page %d holds the write", p)
			require.Equal(t, newVal, host[p*PageSize+PageSize-1], "page %d holds the write", p)
		}
		got := make([]byte, len(buf))
		require.NoError(t, m.ReadAt(got, regions[1].GPA+PageSize))
		require.Equal(t, buf, got)
		// What this round wrote is what the next round must find.
		for i, g := range gpas {
			require.NoError(t, m.ReadAt(want[i*PageSize:(i+1)*PageSize], g))
		}
	}
	st := p.Stats()
	require.NotZero(t, st.Faults, "writes faulted and were resolved by the handler")
	require.NotZero(t, st.VMMWrites, "WriteAt copied the pages it wrote first")
	require.NoError(t, p.Close())
	// Nothing is left protected: a write goes straight through.
	fillPage(regions[0].Host[:PageSize], 1)
}

// Close lets everything through even with a snapshot left half-done.
func TestProtectorCloseUnprotects(t *testing.T) {
	m, err := New([]Spec{{GPA: 0, Size: 16 * PageSize}})
	require.NoError(t, err)
	defer m.Close()
	host := m.Regions()[0].Host
	fillPage(host, 7)
	p, err := NewProtector(m)
	require.NoError(t, err)
	gpas := []GPA{0, PageSize, 2 * PageSize}
	_, err = p.Begin(gpas, make([]byte, 3*PageSize))
	require.NoError(t, err)
	require.NoError(t, p.Close())
	fillPage(host[:3*PageSize], 9)
	require.Equal(t, byte(9), host[2*PageSize+5])
	require.NoError(t, p.Close(), "idempotent")
}
