package stream

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"govmm/vmm/container"
)

// BenchmarkShadowEncode is a sender's work per dirty page with deltas
// (shadow.encode: the zero test, the content hash, the copy or XOR test,
// the shadow and index update) and the session's codec over each full
// section, on one core, for checkpoints of 64k dirty pages against a
// shadow that holds what the previous ones shipped (b.SetBytes: MB/s of
// dirty pages; ×raw: the Pages frames' payloads over a raw page and its
// entry per page). The pages are random bytes (what the codec cannot
// shrink), and each checkpoint they are
//   - fresh: all rewritten, nothing the shadow holds (raw pages: the
//     index's worst case, a hash and a miss per page);
//   - rewritten: one word changed in each (XOR deltas);
//   - moved: the last checkpoint's pages, written into the other half of
//     memory (copies).
func BenchmarkShadowEncode(b *testing.B) {
	const n = 65536
	id := Identity{Regions: []Region{{GPA: 0, Size: 2 * n * PageSize}}}
	rng := rand.New(rand.NewPCG(1, 2))
	mem := make([]byte, n*PageSize)
	for k := 0; k < len(mem); k += 8 {
		binary.LittleEndian.PutUint64(mem[k:], rng.Uint64())
	}
	// next changes the n pages in mem for checkpoint e and returns where
	// page i goes.
	type kind struct {
		name string
		next func(e int) func(i int) GPA
	}
	same := func(i int) GPA { return GPA(i * PageSize) }
	kinds := []kind{
		{"fresh", func(e int) func(int) GPA {
			key := rng.Uint64() | 1
			for k := 0; k < len(mem); k += 8 {
				binary.LittleEndian.PutUint64(mem[k:], binary.LittleEndian.Uint64(mem[k:])*key+uint64(e))
			}
			return same
		}},
		{"rewritten", func(e int) func(int) GPA {
			for i := 0; i < n; i++ {
				mem[i*PageSize+(e*8)%PageSize] ^= byte(e) | 1
			}
			return same
		}},
		{"moved", func(e int) func(int) GPA {
			half := GPA(e%2) * n * PageSize
			return func(i int) GPA { return half + GPA(i*PageSize) }
		}},
	}
	for _, k := range kinds {
		for _, c := range []codec{codecStored, codecS2, codecZstd} {
			b.Run(k.name+"/"+c.String(), func(b *testing.B) {
				sh := newShadow(id)
				pc := newPageCodec(c)
				var ps container.PageSection
				ps.Headroom = pagesHeader
				var xor [PageSize]byte
				var pages, out int
				ship := func(at func(int) GPA, count bool) {
					for i := range n {
						sh.encode(&ps, at(i), mem[i*PageSize:(i+1)*PageSize], xor[:])
						if ps.Len() == MaxPagesPerFrame {
							w := pc.encodeFramed(ps.Framed())
							if count {
								pages, out = pages+ps.Len(), out+len(w)
							}
							ps.Reset()
						}
					}
				}
				ship(k.next(0), false) // what the shadow holds
				b.SetBytes(n * PageSize)
				b.ResetTimer()
				for e := 1; e <= b.N; e++ {
					b.StopTimer()
					at := k.next(e)
					b.StartTimer()
					ship(at, true)
				}
				b.ReportMetric(float64(out)/float64(pages*(PageSize+container.PageEntrySize)), "×raw")
			})
		}
	}
}
