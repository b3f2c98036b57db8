package stream

import (
	"fmt"
	"hash/crc32"
	"log/slog"
	"testing"
)

// memWriter is flat guest memory for the benchmark.
type memWriter []byte

func (m memWriter) WriteAt(p []byte, gpa GPA) error {
	copy(m[gpa:], p)
	return nil
}

// BenchmarkCheckpoint measures SendPage → commit → ack over loopback TCP
// for a checkpoint of 64k distinct non-zero pages (256 MiB), keyed, with
// the receiver staging into a StagingSink over flat memory.
func BenchmarkCheckpoint(b *testing.B) {
	const npages = 64 << 10
	for _, kind := range []Kind{KindEpoch, KindInitialSync} {
		b.Run(fmt.Sprintf("%v-64k-pages", kind), func(b *testing.B) {
			id := Identity{Name: "bench", Regions: []Region{{GPA: 0, Size: npages * PageSize}}, VCPUs: 1}
			quiet := slog.New(slog.DiscardHandler)
			rcfg := Config{Key: testKey, Identity: id, Logger: quiet, Sink: &StagingSink{Dest: make(memWriter, npages*PageSize)}}
			scfg := Config{Key: testKey, Identity: id, Logger: quiet}
			ln, err := Listen("127.0.0.1:0", rcfg)
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			rch := make(chan *Receiver, 1)
			go func() {
				r, err := ln.Accept(b.Context())
				if err != nil {
					b.Error(err)
				}
				rch <- r
			}()
			s, err := Dial(b.Context(), ln.Addr().String(), scfg)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			r := <-rch
			defer r.Close()
			go r.Run(b.Context())

			src := make([]byte, npages*PageSize)
			for i := range npages {
				copy(src[i*PageSize:], page(uint64(i)+1))
			}
			b.SetBytes(npages * PageSize)
			b.ResetTimer()
			epoch := uint64(0)
			for b.Loop() {
				epoch++
				k := kind
				if err := s.BeginCheckpoint(epoch, k); err != nil {
					b.Fatal(err)
				}
				for i := range npages {
					if err := s.SendPage(GPA(i*PageSize), src[i*PageSize:(i+1)*PageSize]); err != nil {
						b.Fatal(err)
					}
				}
				if err := s.SendState(make([]byte, 64<<10)); err != nil {
					b.Fatal(err)
				}
				if err := s.EndCheckpoint(); err != nil {
					b.Fatal(err)
				}
				if err := s.WaitAck(b.Context(), epoch); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/checkpoint")
		})
	}
}

// BenchmarkDeltaPage is a sender's extra work per page with deltas on:
// the XOR with the shadow (counting zero words), the CRC32C of the new
// page and the shadow's update.
func BenchmarkDeltaPage(b *testing.B) {
	p, base, x := page(1), page(2), make([]byte, PageSize)
	b.SetBytes(PageSize)
	for b.Loop() {
		xorPage(x, p, base)
		_ = crc32.Checksum(p, castagnoli)
		copy(base, p)
	}
}
