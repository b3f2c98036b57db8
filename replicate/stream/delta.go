package stream

import (
	"crypto/subtle"
	"encoding/binary"
	"hash/crc32"
)

// Deltas (docs/STREAM.md, version 6): when both ends agreed on them, each
// keeps a shadow of the guest's memory as this stream shipped it, and a
// page that was shipped before may travel as its XOR with that version
// (container.EncXOR), mostly zeroes when little of the page changed, for
// the session's codec to squeeze. A session starts with an empty shadow
// on both ends, so a new standby (re-protection, a migration's
// destination, a reconnect) gets every page whole first.

// helloFlagDeltas, in both hellos, turns deltas on.
const helloFlagDeltas = 1 << 3

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// shadow is the memory of the sender's layout as this stream last
// shipped it, and which pages it shipped. It costs the guest's memory
// size (touched only as pages are shipped). One goroutine uses it: the
// checkpoint goroutine on a sender, Run on a receiver.
type shadow struct {
	regions []Region
	offs    []uint64 // offset of each region in mem
	mem     []byte
	known   []uint64 // bit per page of mem: shipped on this stream
}

func newShadow(id Identity) *shadow {
	s := &shadow{regions: id.Regions}
	var n uint64
	for _, r := range id.Regions {
		s.offs = append(s.offs, n)
		n += r.Size
	}
	s.mem = make([]byte, n)
	s.known = make([]uint64, (n/PageSize+63)/64)
	return s
}

// page returns the shadow of the page at gpa and its index; ok is false
// outside the layout (callers check the layout first).
func (s *shadow) page(gpa GPA) (p []byte, i uint64, ok bool) {
	for k, r := range s.regions {
		if gpa >= r.GPA && uint64(gpa-r.GPA) <= r.Size-PageSize && uint64(gpa)%PageSize == 0 {
			off := s.offs[k] + uint64(gpa-r.GPA)
			return s.mem[off : off+PageSize : off+PageSize], off / PageSize, true
		}
	}
	return nil, 0, false
}

func (s *shadow) isKnown(i uint64) bool { return s.known[i/64]&(1<<(i%64)) != 0 }
func (s *shadow) setKnown(i uint64)     { s.known[i/64] |= 1 << (i % 64) }

// xorPage sets dst = a XOR b (PageSize bytes each) and returns how many
// of dst's and of a's 64-bit words are zero.
func xorPage(dst, a, b []byte) (zeroX, zeroA int) {
	subtle.XORBytes(dst, a, b) // vectorised
	le := binary.LittleEndian
	for i := 0; i < PageSize; i += 8 {
		if le.Uint64(dst[i:]) == 0 {
			zeroX++
		}
		if le.Uint64(a[i:]) == 0 {
			zeroA++
		}
	}
	return zeroX, zeroA
}
