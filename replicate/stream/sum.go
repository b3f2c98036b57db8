package stream

import (
	"encoding/binary"
	"math"
	"sync"
	"time"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// sum64 is the End frame's checksum of a checkpoint (version 9): a
// position-weighted sum in the manner of Fletcher's, over 64-bit
// little-endian words in four lanes, the running sums mod 2^64, folded to
// 64 bits at the end by a multiply-xorshift mix. Each section adds a
// block of its type and length, then its payload in 32-byte blocks, the
// last one padded with zeros.
//
// Why not CRC32C (versions 5–7, the container's own checksum): CRC32C
// runs on the SSE4.2 crc32 instruction, which the lab's emulated CPU
// executes at 60–190 MB/s, so the checkpoint's checksum, taken at both
// ends, cost a migration more than its copies and system calls together.
// These sums are plain loads and adds: about as fast as a memory copy on
// that CPU (7.2 GB/s against CRC32C's 0.19 in one lab run, 1 MiB in
// cache) and on this host (41 against 32 GB/s); where the CPU has AVX2
// and runs it faster, the same sums take two vector adds a block
// (sumLoop: 70-90 GB/s on this host, a frame in cache).
//
// What it catches: a change confined to one 64-bit word always (it moves
// its lane's sum); a section cut, grown, reordered or retyped (the length
// and type blocks, and the position weights); any other change but with
// odds of about 2^-64, except for structured ones that a sum mod 2^64
// misses: changes in two words of one lane that cancel in the lane's sum
// and whose difference times their distance in blocks is 0 mod 2^64 (the
// top bit of two words of one lane flipped, an even number of blocks
// apart). CRC32C misses none of those, but one in 2^32 of everything
// else. It is a guard against corruption and bugs on
// the way (TCP's own checksum is 16 bits), not against an attacker: a
// keyed session's frames are sealed with AES-256-GCM, which covers every
// byte on the wire, so there (version 10) the sum covers only what no tag
// does, the decompressed sections (endpoint.summed).
type sum64 struct {
	a, s [4]uint64
}

// Multipliers of the final mix (odd, with well-spread bits: the 64-bit
// golden ratio and a constant of xxHash's).
const (
	sumK1 = 0x9e3779b97f4a7c15
	sumK2 = 0xc2b2ae3d27d4eb4f
)

// newSum64 starts a checkpoint's sum; the lanes start apart, so that no
// lane's sum starts at 0.
func newSum64() sum64 {
	return sum64{a: [4]uint64{sumK1, sumK2, sumK1 ^ sumK2, ^uint64(sumK1)}}
}

// Section adds a section of type t: a block with t and len(p), then p.
func (c *sum64) Section(t container.Type, p []byte) {
	c.head(t, len(p))
	c.tail(p)
}

// head opens a section of type t and n bytes: the block with t and n.
// The section's bytes follow as blocks (whole 32-byte blocks, as they
// arrive: frameReader.readSummed) and a tail.
func (c *sum64) head(t container.Type, n int) {
	var blk [32]byte
	blk[0] = byte(t)
	binary.LittleEndian.PutUint64(blk[8:], uint64(n))
	c.blocks(blk[:])
}

// tail adds the last bytes of a section: p's whole blocks, then what is
// left of it, padded with zeros to a block.
func (c *sum64) tail(p []byte) {
	n := len(p) &^ 31
	c.blocks(p[:n])
	if n < len(p) {
		var blk [32]byte
		copy(blk[:], p[n:])
		c.blocks(blk[:])
	}
}

// SectionPieces is Section for a payload of n bytes that lies in pieces
// (their concatenation, in order): the same sum, without gathering them.
func (c *sum64) SectionPieces(t container.Type, n int, pieces [][]byte) {
	c.head(t, n)
	var blk [32]byte
	k := 0 // bytes of blk carried over from the pieces before
	for _, p := range pieces {
		if k > 0 {
			m := copy(blk[k:], p)
			k, p = k+m, p[m:]
			if k < len(blk) {
				continue
			}
			c.blocks(blk[:])
			k = 0
		}
		full := len(p) &^ 31
		c.blocks(p[:full])
		k = copy(blk[:], p[full:])
	}
	if k > 0 {
		clear(blk[k:])
		c.blocks(blk[:])
	}
}

// SectionSummed is SectionPieces for a section whose pieces (n bytes in
// all) are each either read here (sums[i] nil) or a page whose
// guestmem.PageSum its copy took (sums[i]): the same sum, without
// reading those pages. It needs every piece to start at a multiple of 4
// bytes into the section, the read ones to be multiples of 4 long and
// the summed ones pages, as a Pages section's count, entry headers and
// pages are; where they are not it returns false and adds nothing.
//
// Why it can: the sum is linear in the section's words. After the
// section's head block, with its N blocks still to come and the lanes at
// a and s, the section leaves a + Σ w and s + N·a + Σ (N−k)·w, the sums
// over its 64-bit words w, k being a word's block (0 to N−1); and each
// word is the sum of its two 4-byte units, the high one shifted by 32.
// So each unit adds to its lane on its own (addUnit), and a page's units
// of one class, which all land in the same slot of their blocks, add
// U[c] and (N−k₀)·U[c] − V[c], V[c] = 128·U[c] − S[c] being Σ d·u over
// the page's chunks d (addPage).
func (c *sum64) SectionSummed(t container.Type, n int, pieces [][]byte, sums []*guestmem.PageSum) bool {
	if len(sums) != len(pieces) {
		return false
	}
	off := 0
	for i, p := range pieces {
		if off%4 != 0 || (sums[i] == nil && len(p)%4 != 0) || (sums[i] != nil && len(p) != guestmem.PageSize) {
			return false
		}
		off += len(p)
	}
	if off != n {
		return false
	}
	c.head(t, n)
	nblk := uint64(n+31) / 32
	for l := range c.s {
		c.s[l] += nblk * c.a[l]
	}
	off = 0
	for i, p := range pieces {
		switch ps := sums[i]; {
		case ps != nil:
			c.addPage(nblk, off/4, ps)
		case off%32 == 0 && len(p)%32 == 0:
			c.addBlocks(nblk, uint64(off/32), p)
		default:
			for j := 0; j < len(p); j += 4 {
				c.addUnit(nblk, (off+j)/4, uint64(binary.LittleEndian.Uint32(p[j:])))
			}
		}
		off += len(p)
	}
	return true
}

// addBlocks adds p, whole blocks from block k of a section of nblk
// blocks (after its head block, and after s took nblk·a), with the
// vector loop: p's own sums from zero lanes are A = Σ w and S = Σ
// (m−j)·w over its m blocks j, and the section needs Σ (nblk−k−j)·w =
// (nblk−k−m)·A + S. A grouped Pages section's headers are such a piece
// (container.GroupedDataOffset).
func (c *sum64) addBlocks(nblk, k uint64, p []byte) {
	var sub sum64
	sub.blocks(p)
	m := uint64(len(p) / 32)
	for l := range c.a {
		c.a[l] += sub.a[l]
		c.s[l] += (nblk-k-m)*sub.a[l] + sub.s[l]
	}
}

// addUnit adds the 4-byte unit v at unit position q of a section of nblk
// blocks (after its head block, and after s took nblk·a).
func (c *sum64) addUnit(nblk uint64, q int, v uint64) {
	k, t := uint64(q/8), q%8
	v <<= 32 * (t % 2)
	c.a[t/2] += v
	c.s[t/2] += (nblk - k) * v
}

// addPage adds the page whose unit 0 is at unit position q of a section
// of nblk blocks, from its sums: unit 8d+c lands in block (q+c)/8 + d,
// slot (q+c) mod 8.
func (c *sum64) addPage(nblk uint64, q int, ps *guestmem.PageSum) {
	for cl := range 8 {
		pos := q + cl
		k, t := uint64(pos/8), pos%8
		sh := 32 * uint(t%2)
		u := ps.U[cl]
		v := 128*u - ps.S[cl]
		c.a[t/2] += u << sh
		c.s[t/2] += ((nblk-k)*u - v) << sh
	}
}

// blocks adds b, a multiple of 32 bytes long, with the loop chosen for
// this CPU (sumLoop). The race detector would instrument each of the
// scalar loop's loads (100 times slower: a -race test's large checkpoints
// spent seconds here) and cannot see into the vector one, so b is
// reported to it as one read instead (raceRead).
func (c *sum64) blocks(b []byte) {
	raceRead(b)
	sumLoop().blocks(&c.a, &c.s, b)
}

// blocksScalar is the sum's loop in Go, for any CPU: per 32-byte block,
// each lane adds its word to a, then a to s.
//
//go:norace
func blocksScalar(a, s *[4]uint64, b []byte) {
	a0, a1, a2, a3 := a[0], a[1], a[2], a[3]
	s0, s1, s2, s3 := s[0], s[1], s[2], s[3]
	for ; len(b) >= 32; b = b[32:] {
		a0 += binary.LittleEndian.Uint64(b)
		a1 += binary.LittleEndian.Uint64(b[8:])
		a2 += binary.LittleEndian.Uint64(b[16:])
		a3 += binary.LittleEndian.Uint64(b[24:])
		s0 += a0
		s1 += a1
		s2 += a2
		s3 += a3
	}
	*a = [4]uint64{a0, a1, a2, a3}
	*s = [4]uint64{s0, s1, s2, s3}
}

// sumLoop is the loop blocks runs: the vector one (sum_amd64.s: the four
// lanes are one AVX2 register, a block two vector adds) where the CPU has
// it and it is the faster of the two on this machine, else the scalar one.
// Both give the same sums (TestSum64VectorSame), so each end chooses on
// its own. Measured, not assumed: on this project's host the vector loop
// sums a frame in cache 3.6 times as fast (90 against 25 GB/s), but the
// lab's emulated CPU runs it at 0.8 times the scalar loop's speed.
var sumLoop = sync.OnceValue(func() loop {
	if blocksVector == nil || !vectorFaster() {
		return loop{"scalar", blocksScalar}
	}
	return loop{"avx2", blocksVector}
})

// A loop is one of the sum's loops and its name.
type loop struct {
	name   string
	blocks blockFunc
}

// blockFunc is a loop of the sum: it adds b, a multiple of 32 bytes long,
// to the lanes a and s.
type blockFunc func(a, s *[4]uint64, b []byte)

// vectorFaster times both loops over the same 64 KiB, the best of five
// runs each (well under a millisecond on either CPU), and says whether
// the vector loop won.
func vectorFaster() bool {
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	best := func(f blockFunc) time.Duration {
		var a, s [4]uint64
		b := time.Duration(math.MaxInt64)
		for range 5 {
			start := time.Now()
			f(&a, &s, buf)
			b = min(b, time.Since(start))
		}
		return b
	}
	return best(blocksVector) < best(blocksScalar)
}

// SumLoop names the loop this process sums checkpoints with ("avx2" or
// "scalar"), for a benchmark's report.
func SumLoop() string { return sumLoop().name }

// Sum64 folds the sums so far into the value the End frame carries.
func (c *sum64) Sum64() uint64 {
	h := uint64(sumK2)
	for _, v := range [8]uint64{c.a[0], c.a[1], c.a[2], c.a[3], c.s[0], c.s[1], c.s[2], c.s[3]} {
		h = mix64(h ^ v)
	}
	return h
}

// mix64 is a multiply-xorshift finalizer: every input bit moves about
// half the output bits.
func mix64(h uint64) uint64 {
	h ^= h >> 33
	h *= sumK1
	h ^= h >> 29
	h *= sumK2
	h ^= h >> 32
	return h
}
