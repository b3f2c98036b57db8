package stream

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"hash/maphash"

	"govmm/vmm/container"
)

// Deltas (docs/STREAM.md, version 6): when both ends agreed on them, each
// keeps a shadow of the guest's memory as this stream shipped it, and a
// page that was shipped before may travel as its XOR with that version
// (container.EncXOR), mostly zeroes when little of the page changed, for
// the session's codec to squeeze. A session starts with an empty shadow
// on both ends, so a new standby (re-protection, a migration's
// destination, a reconnect) gets every page whole first.
//
// Copies (version 8): a page whose bytes the shadow already holds, at its
// own gpa (rewritten unchanged) or at another (a file's pages written
// again elsewhere: the page cache's copy of what was just read, untar into
// freed pages), travels as a reference to that gpa (container.EncCopy,
// 12 bytes). The sender finds such pages by a hash of their contents and
// compares the bytes before it sends a reference; the receiver copies its
// shadow's page and checks the CRC32C the sender took.

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

	// The sender's index of the shadow's contents (nil on a receiver):
	// the hash of each non-zero page's shadow by page index, and a page
	// index by hash (the last page shipped with those contents). An entry
	// may be stale (its page shipped other bytes since): a hit is only
	// taken once the bytes compare equal.
	seed   maphash.Seed
	hashes []uint64
	byHash map[uint64]uint32
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

// gpaOf is the gpa of the page with index i.
func (s *shadow) gpaOf(i uint64) GPA {
	off := i * PageSize
	k := len(s.offs) - 1
	for k > 0 && s.offs[k] > off {
		k--
	}
	return s.regions[k].GPA + GPA(off-s.offs[k])
}

func (s *shadow) isKnown(i uint64) bool { return s.known[i/64]&(1<<(i%64)) != 0 }
func (s *shadow) setKnown(i uint64)     { s.known[i/64] |= 1 << (i % 64) }

// encode adds page (the sender's copy of the page at gpa, inside the
// layout) to pages as the stream with deltas ships it, updates the
// shadow, and returns the encoding chosen: zero for an all-zero page;
// copy when the shadow holds the same bytes at some page; xor when the
// page was shipped before and its XOR with that version has more zero
// words than the page itself (a rewritten page travels whole); else raw.
// xor is scratch space of PageSize bytes.
func (s *shadow) encode(pages *container.PageSection, gpa GPA, page, xor []byte) container.Encoding {
	if s.byHash == nil {
		s.seed = maphash.MakeSeed()
		s.hashes = make([]uint64, len(s.mem)/PageSize)
		s.byHash = make(map[uint64]uint32)
	}
	base, i, _ := s.page(gpa)
	known := s.isKnown(i)
	s.setKnown(i)
	if bytes.Equal(page, zeroPage[:]) {
		pages.Add(uint64(gpa), nil)
		s.store(i, base, page, 0)
		return container.EncZero
	}
	h := maphash.Bytes(s.seed, page)
	if j, ok := s.byHash[h]; ok {
		src := s.mem[uint64(j)*PageSize : (uint64(j)+1)*PageSize]
		if bytes.Equal(src, page) {
			pages.AddCopyOf(uint64(gpa), crc32.Checksum(page, castagnoli), uint64(s.gpaOf(uint64(j))))
			s.store(i, base, page, h)
			return container.EncCopy
		}
	}
	enc := container.EncRaw
	if zx, zp := 0, 0; known {
		if zx, zp = xorPage(xor, page, base); zx > zp {
			enc = container.EncXOR
		}
	}
	if enc == container.EncXOR {
		pages.AddXOR(uint64(gpa), crc32.Checksum(page, castagnoli), xor)
	} else {
		pages.Add(uint64(gpa), page)
	}
	s.store(i, base, page, h)
	return enc
}

// store makes page the shadow of page i (whose shadow is base), indexed
// under hash h (0: a zero page, not indexed).
func (s *shadow) store(i uint64, base, page []byte, h uint64) {
	if old := s.hashes[i]; old != 0 && old != h && s.byHash[old] == uint32(i) {
		delete(s.byHash, old)
	}
	copy(base, page)
	s.hashes[i] = h
	if h != 0 {
		s.byHash[h] = uint32(i)
	}
}

// apply is the receiver's half: it makes base, the shadow of page i at
// gpa (known: shipped before on this stream, as it was before this
// entry), what the xor or copy entry data describes, and checks the
// result against the CRC32C the sender took of the page.
func (s *shadow) apply(gpa GPA, base []byte, i uint64, known bool, enc container.Encoding, data []byte) error {
	switch enc {
	case container.EncXOR:
		if !known {
			return fmt.Errorf("page %#x: a delta against a version never shipped on this stream: %w", uint64(gpa), ErrProtocol)
		}
		xorPage(base, base, data[4:])
	case container.EncCopy:
		src := GPA(binary.LittleEndian.Uint64(data[4:]))
		from, j, ok := s.page(src)
		switch {
		case !ok:
			return fmt.Errorf("page %#x: a copy of %#x, outside the memory layout: %w", uint64(gpa), uint64(src), ErrOutOfRange)
		case j == i && !known, j != i && !s.isKnown(j):
			return fmt.Errorf("page %#x: a copy of %#x, never shipped on this stream: %w", uint64(gpa), uint64(src), ErrProtocol)
		}
		copy(base, from)
	default:
		return fmt.Errorf("page %#x: encoding %d: %w", uint64(gpa), enc, ErrFrame)
	}
	if got, want := crc32.Checksum(base, castagnoli), binary.LittleEndian.Uint32(data); got != want {
		return fmt.Errorf("page %#x: %v applied to the wrong base (crc32c %#08x, sender's %#08x): %w", uint64(gpa), encName(enc), got, want, ErrChecksum)
	}
	return nil
}

func encName(enc container.Encoding) string {
	if enc == container.EncCopy {
		return "copy"
	}
	return "delta"
}

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
