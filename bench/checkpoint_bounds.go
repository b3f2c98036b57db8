package bench

import (
	"context"
	"crypto/cipher"
	"encoding/binary"
	"io"
	"math"
	"net"
	"slices"
	"sort"
	"time"

	"govmm/vmm/guestmem"
)

// measureBounds times, for each page count, copying that many pages with
// copy() into a warm buffer (memcpyBounds), and sending that many bytes
// over a loopback TCP connection until a one-byte ack comes back
// (loopbackBounds): the two lower bounds the report compares against.
func measureBounds(ctx context.Context, counts []int, reps int) ([]BoundSample, error) {
	maxN := maxInt(counts)
	src := make([]byte, maxN*guestmem.PageSize)
	for i := range src {
		src[i] = byte(i)
	}
	out := memcpyBounds(src, counts, reps)
	lb, err := loopbackBounds(ctx, src, counts, reps)
	return append(out, lb...), err
}

// memcpyBounds copies n pages of src one at a time into a warm buffer,
// reps times per count.
func memcpyBounds(src []byte, counts []int, reps int) []BoundSample {
	dst := make([]byte, len(src))
	copy(dst, src) // both warm
	var out []BoundSample
	for _, n := range counts {
		for r := 0; r < reps; r++ {
			t0 := time.Now()
			for p := 0; p < n; p++ {
				off := p * guestmem.PageSize
				copy(dst[off:off+guestmem.PageSize], src[off:off+guestmem.PageSize])
			}
			out = append(out, BoundSample{Kind: "memcpy", Pages: n, Time: time.Since(t0)})
		}
	}
	return out
}

// loopbackBounds writes a length and n pages of src on a loopback TCP
// connection and waits for the receiver's one-byte ack, reps times per
// count after one that warms the socket buffers.
func loopbackBounds(ctx context.Context, src []byte, counts []int, reps int) ([]BoundSample, error) {
	tx, rx, err := loopbackPair(ctx)
	if err != nil {
		return nil, err
	}
	defer tx.Close()
	defer rx.Close()
	go ackEach(rx, nil)
	var out []BoundSample
	ack := make([]byte, 1)
	hdr := make([]byte, 8)
	for _, n := range counts {
		size := n * guestmem.PageSize
		for r := 0; r < reps+1; r++ {
			putLeUint64(hdr, uint64(size))
			t0 := time.Now()
			if _, err := tx.Write(hdr); err != nil {
				return out, err
			}
			if _, err := tx.Write(src[:size]); err != nil {
				return out, err
			}
			if _, err := io.ReadFull(tx, ack); err != nil {
				return out, err
			}
			if r > 0 {
				out = append(out, BoundSample{Kind: "loopback", Pages: n, Time: time.Since(t0)})
			}
		}
	}
	return out, nil
}

// The sealed bound (ack suite, keyed points): the same bytes as the
// loopback bound's, sealed with AES-256-GCM under the point's key in
// chunks of sealChunk (a Pages frame's size), written chunk by chunk
// after the length with sealedBit set, and opened chunk by chunk as they
// arrive (ackEach) before the one-byte ack: what moving those bytes
// costs once each is sealed and opened, done the plain way, one chunk at
// a time, without the stream's framing, sums or pipelining.
const (
	sealedBit = 1 << 63
	sealChunk = 1 << 20
)

// The held bound (ack suite, unkeyed points): the loopback bound's bytes,
// written after the length with heldBit set, which the reader keeps,
// all of them, in one buffer the transfer's size (reused from transfer to
// transfer, as a standby reuses its staging) before the one-byte ack,
// instead of reading each megabyte over the last in one buffer that
// stays in cache. A standby must do that much: it may ack a checkpoint
// only once it holds all of it, and it applies it only after. What is
// left between the held bound and the stream is the stream's own work
// (framing, the End sum) and the standby's copy into memory.
const (
	heldBit = 1 << 62
	maxHeld = 1 << 31 // the most a held transfer may be (65,536 pages are 270 MB)
)

// The applied bound (ack suite, unkeyed points): the held bound, and
// after each ack the reader copies what it held into guest memory
// (guestmem, page by page through an NTWriter, as a StagingSink applies
// a committed checkpoint) on a goroutine of its own, while it reads the
// next transfer into its other buffer; it acks a transfer only once the
// last one's copy is done, as a StagingSink's commit waits for the last
// apply before the Receiver acks. That is the least a standby does for
// each checkpoint: hold all of it until it may ack, then put it where the
// guest would run. A length announcing it has heldBit and appliedBit set.
// Keyed points have a *sealed applied* bound, under the name "applied"
// too: the sealed bound's transfer (sealedBit) with heldBit and
// appliedBit as well, each chunk opened straight into the held buffer
// (as a Receiver opens a Pages frame where the StagingSink keeps it),
// then applied the same way.
const appliedBit = 1 << 60

// applier is the applied bound's reader state: two buffers, the one the
// next transfer is held in (cur) and the one being copied, and the
// memory they are copied into.
type applier struct {
	bufs [2][]byte
	cur  int
	mem  *guestmem.Memory
	done chan error // the running copy's result; nil when none runs
}

// buffer is where to hold the next transfer, n bytes.
func (a *applier) buffer(n int) []byte {
	a.bufs[a.cur] = slices.Grow(a.bufs[a.cur][:0], n)[:n]
	return a.bufs[a.cur]
}

// settle waits for the running copy, if any, and returns its failure.
func (a *applier) settle() error {
	if a.done == nil {
		return nil
	}
	err := <-a.done
	a.done = nil
	return err
}

// start waits for the last copy, then starts copying the transfer just
// held into memory (grown first if it is too small) and switches
// buffers.
func (a *applier) start() error {
	if err := a.settle(); err != nil {
		return err
	}
	b := a.bufs[a.cur]
	size := max(uint64(len(b))+guestmem.PageSize-1, guestmem.PageSize) &^ (guestmem.PageSize - 1)
	if a.mem == nil || a.mem.Size() < size {
		if a.mem != nil {
			_ = a.mem.Close()
		}
		m, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: size}})
		if err != nil {
			a.mem = nil
			return err
		}
		a.mem = m
	}
	done, mem := make(chan error, 1), a.mem
	a.done = done
	go func() { done <- applyHeld(mem, b) }()
	a.cur ^= 1
	return nil
}

// close waits for the running copy and unmaps the memory.
func (a *applier) close() {
	_ = a.settle()
	if a.mem != nil {
		_ = a.mem.Close()
	}
}

// applyHeld copies b into mem from address 0, a page at a time through
// one NTWriter.
func applyHeld(mem *guestmem.Memory, b []byte) error {
	w := mem.NTWriter()
	defer w.Flush()
	for off := 0; off < len(b); off += guestmem.PageSize {
		if err := w.WriteAt(b[off:min(off+guestmem.PageSize, len(b))], guestmem.GPA(off)); err != nil {
			return err
		}
	}
	return nil
}

// heldTransfer writes p on tx for the held bound (bits heldBit) or the
// applied bound (heldBit|appliedBit) and waits for the one-byte ack.
func heldTransfer(tx net.Conn, p []byte, bits uint64) error {
	var hdr [8]byte
	putLeUint64(hdr[:], uint64(len(p))|bits)
	bufs := net.Buffers{hdr[:], p}
	if _, err := bufs.WriteTo(tx); err != nil {
		return err
	}
	_, err := io.ReadFull(tx, hdr[:1])
	return err
}

// sealNonce counts chunks: both ends of one connection take the same
// nonces in the same order, and none twice.
type sealNonce struct {
	n uint64
	b [16]byte
}

// next is the next nonce, of a's size.
func (s *sealNonce) next(a cipher.AEAD) []byte {
	s.n++
	binary.LittleEndian.PutUint64(s.b[4:], s.n)
	return s.b[:a.NonceSize()]
}

// sealTransfer writes p sealed (see sealedBit) on tx, its length with
// bits as well (0, or heldBit|appliedBit for the sealed applied bound),
// and waits for the one-byte ack; out is the caller's buffer for a
// sealed chunk.
func sealTransfer(tx net.Conn, aead cipher.AEAD, nonce *sealNonce, p []byte, out *[]byte, bits uint64) error {
	var hdr [8]byte
	putLeUint64(hdr[:], uint64(len(p))|sealedBit|bits)
	if _, err := tx.Write(hdr[:]); err != nil {
		return err
	}
	for len(p) > 0 {
		n := min(len(p), sealChunk)
		*out = aead.Seal((*out)[:0], nonce.next(aead), p[:n], nil)
		if _, err := tx.Write(*out); err != nil {
			return err
		}
		p = p[n:]
	}
	_, err := io.ReadFull(tx, hdr[:1])
	return err
}

// loopbackPair is both ends of one loopback TCP connection.
func loopbackPair(ctx context.Context) (tx, rx net.Conn, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, nil, err
	}
	defer ln.Close()
	type conn struct {
		c   net.Conn
		err error
	}
	accepted := make(chan conn, 1)
	go func() {
		c, err := ln.Accept()
		accepted <- conn{c, err}
	}()
	var d net.Dialer
	if tx, err = d.DialContext(ctx, "tcp", ln.Addr().String()); err != nil {
		return nil, nil, err
	}
	a := <-accepted
	if a.err != nil {
		tx.Close()
		return nil, nil, a.err
	}
	return tx, a.c, nil
}

// ackEach reads a length, then that many bytes, then acks with one byte,
// until the connection closes. A length with its top bit set (sealedBit)
// announces a sealed transfer (sealTransfer): that many bytes of
// plaintext, each sealChunk of them sealed with aead and opened here as
// it arrives; without aead, the connection ends there. One with heldBit
// set announces a held transfer (heldTransfer): its bytes are kept, all
// of them, until the ack; with appliedBit too, an applied one (applier):
// kept, then copied into memory after the ack. A sealed transfer with
// heldBit opens each chunk into the kept bytes.
func ackEach(rx net.Conn, aead cipher.AEAD) {
	buf := make([]byte, 1<<20)
	hdr := make([]byte, 8)
	var ct, held []byte
	var nonce sealNonce
	var app applier
	defer app.close()
	for {
		if _, err := io.ReadFull(rx, hdr); err != nil {
			return
		}
		v := leUint64(hdr)
		left := int(v &^ (sealedBit | heldBit | appliedBit))
		into := func(int) []byte { return buf } // each read over the last
		if v&appliedBit != 0 && v&heldBit == 0 {
			return
		}
		if v&heldBit != 0 {
			if left > maxHeld {
				return
			}
			var h []byte
			if v&appliedBit != 0 {
				h = app.buffer(left)
			} else {
				held = slices.Grow(held[:0], left)[:left]
				h = held
			}
			into = func(off int) []byte { return h[off:] } // kept whole
		}
		if v&sealedBit != 0 {
			if aead == nil {
				return
			}
			for off := 0; left > 0; {
				n := min(left, sealChunk)
				ct = slices.Grow(ct[:0], n+aead.Overhead())[:n+aead.Overhead()]
				if _, err := io.ReadFull(rx, ct); err != nil {
					return
				}
				dst := ct[:0] // opened in place, each chunk over the last
				if v&heldBit != 0 {
					dst = into(off)[:0] // opened where it is kept
				}
				if _, err := aead.Open(dst, nonce.next(aead), ct, nil); err != nil {
					return
				}
				left -= n
				off += n
			}
		}
		for off := 0; left > 0; { // a megabyte at most a read
			k, err := rx.Read(into(off)[:min(left, len(buf))])
			if err != nil {
				return
			}
			left -= k
			off += k
		}
		if v&appliedBit != 0 {
			if err := app.start(); err != nil {
				return
			}
		}
		if _, err := rx.Write([]byte{1}); err != nil {
			return
		}
	}
}

// boundAt is the median time of kind for n pages, interpolated
// log-linearly between measured counts.
func boundAt(bounds []BoundSample, kind string, n float64) float64 {
	by := map[int][]float64{}
	for _, b := range bounds {
		if b.Kind == kind {
			by[b.Pages] = append(by[b.Pages], usOf(b.Time))
		}
	}
	var counts []int
	for c := range by {
		counts = append(counts, c)
	}
	sort.Ints(counts)
	if len(counts) == 0 || n <= 0 {
		return math.NaN()
	}
	med := func(c int) float64 { return Summarize(by[c]).Median }
	if n <= float64(counts[0]) {
		return med(counts[0]) * n / float64(counts[0])
	}
	for i := 1; i < len(counts); i++ {
		lo, hi := float64(counts[i-1]), float64(counts[i])
		if n <= hi {
			f := (n - lo) / (hi - lo)
			return med(counts[i-1]) + f*(med(counts[i])-med(counts[i-1]))
		}
	}
	last := counts[len(counts)-1]
	return med(last) * n / float64(last)
}

// boundMedian is the median time of kind measured at exactly n pages.
func boundMedian(bounds []BoundSample, kind string, n int) float64 {
	var xs []float64
	for _, b := range bounds {
		if b.Kind == kind && b.Pages == n {
			xs = append(xs, usOf(b.Time))
		}
	}
	return Summarize(xs).Median
}
