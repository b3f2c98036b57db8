package guestmem

import (
	"testing"
)

// BenchmarkProtect times write-protecting a run of 65536 populated pages
// of plain anonymous memory (no KVM) and copying them out.
func BenchmarkProtect(b *testing.B) {
	const pages = 65536
	m, err := New([]Spec{{GPA: 0, Size: pages * PageSize}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	host := m.Regions()[0].Host
	set := bitmapSet{make([]uint64, pages/64)}
	for i := range pages {
		host[i*PageSize] = 1
	}
	for w := range set[0] {
		set[0][w] = ^uint64(0)
	}
	p, err := NewProtector(m)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	dst := make([]byte, pages*PageSize)
	b.ResetTimer()
	for range b.N {
		s, err := p.Begin(set, dst)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		s.Copy()
		if _, err := s.Wait(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
