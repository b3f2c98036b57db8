package bench

import (
	"math"
	"time"

	"govmm/replicate/stream"
	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// measureCompress times the sender's page codec c over the page sections
// of one epoch of pages dirtied pages holding content, on this goroutine
// (one core), as the sender builds and compresses them.
func measureCompress(c stream.Compression, content string, pages int) (CompressSample, error) {
	ws := make([]byte, pages*guestmem.PageSize)
	if content == ContentBinary {
		if err := fillBinary(ws); err != nil {
			return CompressSample{}, err
		}
	}
	for i := 0; i < len(ws); i += guestmem.PageSize {
		ws[i]++ // the Dirtier's write
	}
	enc := stream.NewPageEncoder(c)
	s := CompressSample{Compression: c, Content: content, Pages: pages}
	var sec container.PageSection
	best := time.Duration(math.MaxInt64)
	for range 3 { // best of three: the host is shared
		in, out := 0, 0
		start := time.Now()
		for i := 0; i < pages; i += container.MaxPagesPerSection {
			sec.Reset()
			for j := i; j < min(i+container.MaxPagesPerSection, pages); j++ {
				sec.Add(uint64(j*guestmem.PageSize), ws[j*guestmem.PageSize:(j+1)*guestmem.PageSize])
			}
			p := sec.Payload()
			in += len(p)
			out += len(enc.Encode(p))
		}
		if d := time.Since(start); d < best {
			best = d
		}
		s.In, s.Out = in, out
	}
	s.Time = best
	return s, nil
}
