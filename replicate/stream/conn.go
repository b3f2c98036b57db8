package stream

import (
	"bufio"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"syscall"
	"time"

	"govmm/vmm/container"
)

// handshakeKey MACs the handshake frames, before a session key exists. It
// is public: those frames are authenticated by the proofs, which cover
// both hellos, and the MAC only catches corruption. The handshake frames
// keep the version 1 framing (HMAC-SHA256 trailer under this key), so that
// a peer of any version can read a hello far enough to refuse its version.
var handshakeKey = []byte("govmm-stream/1 handshake (public key)")

// frameNonce is the frame's AEAD nonce: 4 zero bytes, then the frame's
// sequence number (u64, little-endian, as in the header), then, for
// AEGIS-128L's 16-byte nonces, 4 more zero bytes. Sequence numbers never
// repeat within a direction, and each direction of each session has its
// own key, so a nonce is never reused under a key.
func frameNonce(a cipher.AEAD, n *[nonceLen]byte, seq uint64) []byte { return partNonce(a, n, seq, 0) }

// partNonce is the nonce of part number part of a frame sealed in parts
// (sealedParts): the part number (u32, little-endian) in place of
// frameNonce's zeros. Part 0 is frameNonce, so every (sequence number,
// part) pair has a nonce of its own.
func partNonce(a cipher.AEAD, n *[nonceLen]byte, seq uint64, part uint32) []byte {
	binary.LittleEndian.PutUint32(n[0:], part)
	binary.LittleEndian.PutUint64(n[4:], seq)
	return n[:a.NonceSize()] // bytes 12-15 stay zero
}

// nonceLen is the longest nonce of a session cipher: AEGIS-128L's 16
// bytes (AES-256-GCM takes the standard 12).
const nonceLen = 16

// frameWriter frames payloads. During the handshake: header, payload,
// HMAC-SHA256 over both under handshakeKey. Once setKey has installed the
// direction's session key: header, then the payload sealed with the
// session's cipher (AEGIS-128L or AES-256-GCM: ciphertext and a 16-byte
// tag), the header as additional data. An
// unkeyed (Insecure) session, which has nothing to seal with, instead
// frames header, payload and a CRC32C of both (setPlain). Its owner
// serializes calls (endpoint.wmu).
type frameWriter struct {
	bw    *bufio.Writer
	dw    *deadlineWriter // under bw, if it is one: a large frame goes straight to it
	mac   hash.Hash       // handshake frames
	aead  cipher.AEAD     // session frames, once set
	plain bool            // session frames of an unkeyed session: CRC32C trailer
	seq   uint64
	hdr   [headerSize]byte
	sum   [macSize]byte
	nonce [nonceLen]byte
	out   []byte    // sealed payload
	body  [][]byte  // writePieces' frame
	ctr   *counters // bytes and frames sent, seal and write time
}

func newFrameWriter(w io.Writer, ctr *counters) *frameWriter {
	dw, _ := w.(*deadlineWriter)
	return &frameWriter{
		bw:  bufio.NewWriterSize(w, 256<<10),
		dw:  dw,
		mac: hmac.New(sha256.New, handshakeKey),
		ctr: ctr,
	}
}

func (w *frameWriter) setKey(c sessionCipher, k []byte) { w.aead = newAEAD(c, k) }

// setPlain switches an unkeyed session's frames to the CRC32C trailer.
func (w *frameWriter) setPlain() { w.plain = true }

// directWrite is the payload size from which a frame bypasses the
// writer's buffer (a Pages frame of 16 pages or more): a copy saved
// outweighs a write system call more.
const directWrite = 64 << 10

// crcSize is the trailer of an unkeyed session's frames: CRC32C
// (Castagnoli) of header and payload, little-endian.
const crcSize = 4

// frameCRC is an unkeyed session's frame trailer: the CRC32C of the
// frame's header and payload, except that a Pages, Disk or State frame's
// payload is left out: it is a checkpoint section, which the End frame's
// CRC32C covers already, and nothing of a checkpoint is applied before
// that verifies (a page written straight to memory in initial sync is
// discarded with the rest when it does not). One pass less over every
// byte at each end, where CRC32C is slow (61 MB/s measured on the lab's
// emulated CPU).
func frameCRC(t frameType, hdr, payload []byte) uint32 {
	c := crc32.Checksum(hdr, castagnoli)
	switch t {
	case framePages, frameDisk, frameState:
		return c
	}
	return crc32.Update(c, castagnoli, payload)
}

func (w *frameWriter) write(t frameType, payload []byte) error {
	if len(payload) > MaxFramePayload {
		// A bug on this side: never put on the wire what the peer must refuse.
		return fmt.Errorf("write %v frame of %d bytes: %w", t, len(payload), ErrTooLarge)
	}
	putHeader(w.hdr[:], header{length: uint32(len(payload)), typ: t, seq: w.seq})
	var body [][]byte
	t0 := time.Now()
	if w.aead != nil {
		w.out = w.aead.Seal(w.out[:0], frameNonce(w.aead, &w.nonce, w.seq), payload, w.hdr[:])
		body = [][]byte{w.hdr[:], w.out}
	} else if w.plain {
		binary.LittleEndian.PutUint32(w.sum[:], frameCRC(t, w.hdr[:], payload))
		body = [][]byte{w.hdr[:], payload, w.sum[:crcSize]}
	} else {
		w.mac.Reset()
		w.mac.Write(w.hdr[:])
		w.mac.Write(payload)
		body = [][]byte{w.hdr[:], payload, w.mac.Sum(w.sum[:0])}
	}
	t1 := time.Now()
	w.ctr.sealNanos.Add(int64(t1.Sub(t0)))
	defer func() { w.ctr.writeNanos.Add(int64(time.Since(t1))) }()
	return w.put(body, len(payload))
}

// writePieces writes a Pages frame of an unkeyed session whose payload
// is the concatenation of pieces (n bytes), from where they lie: the
// pages of a section that references them (pageSlot). Its CRC32C trailer
// covers the header alone, as every Pages frame's (frameCRC), so the
// pieces are read once, by the kernel. A sealed session never comes
// here: it seals such a frame in parts (writeSealedParts).
func (w *frameWriter) writePieces(t frameType, pieces [][]byte, n int) error {
	if w.aead != nil || !w.plain || t != framePages {
		panic("stream: writePieces outside an unkeyed session's Pages frames") // a bug on this side
	}
	if n > MaxFramePayload {
		return fmt.Errorf("write %v frame of %d bytes: %w", t, n, ErrTooLarge)
	}
	putHeader(w.hdr[:], header{length: uint32(n), typ: t, seq: w.seq})
	binary.LittleEndian.PutUint32(w.sum[:], frameCRC(t, w.hdr[:], nil))
	w.body = append(append(append(w.body[:0], w.hdr[:]), pieces...), w.sum[:crcSize])
	t0 := time.Now()
	defer func() { w.ctr.writeNanos.Add(int64(time.Since(t0))) }()
	return w.put(w.body, n)
}

// writeSealedParts writes a keyed session's Pages frame whose payload
// (n bytes) is head followed by parts, sealed part by part (a frame with
// a split, sealedParts): head, the Pages header and the grouped
// section up to its data, under part number 0's nonce, then each of
// parts, a run of the section's data, under the next number's. parts
// are the runs of entries with data that sealedParts names, in order.
// Sealing reads the pages where they lie, so they are not first copied
// into a section of their own.
func (w *frameWriter) writeSealedParts(t frameType, head []byte, parts [][]byte, n int) error {
	if w.aead == nil || t != framePages || len(head) == 0 || len(head) > maxSplit || len(parts) == 0 || len(parts) > maxParts || n <= len(head) {
		panic("stream: writeSealedParts outside a keyed session's Pages frames, or without data") // a bug on this side
	}
	if n > MaxFramePayload {
		return fmt.Errorf("write %v frame of %d bytes: %w", t, n, ErrTooLarge)
	}
	putHeader(w.hdr[:], header{length: uint32(n), typ: t, split: uint16(len(head)), parts: uint8(len(parts)), seq: w.seq})
	t0 := time.Now()
	w.out = w.aead.Seal(w.out[:0], partNonce(w.aead, &w.nonce, w.seq, 0), head, w.hdr[:])
	for i, p := range parts {
		w.out = w.aead.Seal(w.out, partNonce(w.aead, &w.nonce, w.seq, uint32(i+1)), p, w.hdr[:])
	}
	t1 := time.Now()
	w.ctr.sealNanos.Add(int64(t1.Sub(t0)))
	defer func() { w.ctr.writeNanos.Add(int64(time.Since(t1))) }()
	return w.put([][]byte{w.hdr[:], w.out}, n)
}

// put writes a frame's body (header, payload pieces, trailer; payload
// bytes of payload) and counts it.
func (w *frameWriter) put(body [][]byte, payload int) error {
	n := 0
	if payload >= directWrite && w.dw != nil {
		// Past the buffer: what it holds first, then the frame in one
		// writev, so that its payload is not copied into the buffer.
		if err := w.bw.Flush(); err != nil {
			return err
		}
		k, err := w.dw.writeBuffers(body)
		if err != nil {
			return err
		}
		n = int(k)
	} else {
		for _, b := range body {
			if _, err := w.bw.Write(b); err != nil {
				return err
			}
			n += len(b)
		}
	}
	w.seq++
	w.ctr.bytesSent.Add(uint64(n))
	w.ctr.framesSent.Add(1)
	return nil
}

func (w *frameWriter) flush() error {
	t0 := time.Now()
	err := w.bw.Flush()
	w.ctr.writeNanos.Add(int64(time.Since(t0)))
	return err
}

// frameReader reads, authenticates and decrypts frames. Only the
// endpoint's reading goroutine uses it. A frame it returns aliases the
// slot cur (its read buffer and decompressed section): a receiver's
// reader hands slots round (recvPipe), so that the frame it reads next
// does not overwrite the ones still being staged.
type frameReader struct {
	br     *bufio.Reader
	mac    hash.Hash   // handshake frames
	aead   cipher.AEAD // session frames, once set
	plain  bool        // session frames of an unkeyed session: CRC32C trailer
	seq    uint64      // expected sequence number of the next frame
	off    int64       // stream offset of the next frame
	start  int64       // stream offset of the frame last read (for errors)
	layout Identity    // the sender's layout, once known
	zc     *pageCodec  // the session's page codec (nil: stored sections only)
	deltas bool        // the session agreed on deltas
	cur    *rxSlot     // where the next frame is read and decoded
	// secSum is the End frame's sum of the checkpoint read so far (a
	// receiver's; sumFrame), taken here, as each section arrives, so that
	// a stored Pages frame's bytes are summed straight after each read
	// copied them in, while they are in cache (readSummed); summedNow
	// says the frame just read was.
	secSum    sum64
	summedNow bool
	// stateBase and stateNext are the last checkpoint's state and the
	// current one's so far (trackState).
	stateBase, stateNext []byte
	hdr                  [headerSize]byte
	sum                  [macSize]byte
	want                 [macSize]byte
	nonce                [nonceLen]byte
	parts                []int     // readSealedParts': the data parts' lengths
	ctr                  *counters // bytes and frames received, open time
}

// rxSlot is what a decoded frame aliases: the buffer its payload was read
// (and opened) into, and the frame, whose section buffer holds a
// decompressed page section.
type rxSlot struct {
	buf []byte
	f   frame
}

// readBuffer is the frame reader's buffer: enough for a few small
// frames (heartbeats, acks, a Begin or End) per read system call, and
// small, since a payload larger than what the buffer holds is read
// straight into its slot, but what a read of the header brought into the
// buffer with it is copied (up to 256 KiB of each Pages frame, 4% of the
// CPU time of an unkeyed checkpoint of 1,000 pages, with the 256 KiB this
// was).
const readBuffer = 16 << 10

func newFrameReader(r io.Reader, ctr *counters) *frameReader {
	return &frameReader{
		br:  bufio.NewReaderSize(r, readBuffer),
		mac: hmac.New(sha256.New, handshakeKey),
		cur: new(rxSlot),
		ctr: ctr,
	}
}

func (r *frameReader) setKey(c sessionCipher, k []byte) { r.aead = newAEAD(c, k) }

// setPlain switches an unkeyed session's frames to the CRC32C trailer.
func (r *frameReader) setPlain() { r.plain = true }

// next reads, authenticates, decrypts and decodes one frame. A clean end
// of stream before a header is io.EOF; any other shortfall is
// ErrTruncated. The returned frame is valid until the next call with the
// same slot.
func (r *frameReader) next() (*frame, error) {
	r.start = r.off
	if n, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		if n == 0 && errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, truncated("frame header", err)
	}
	h, err := parseHeader(r.hdr[:])
	if err != nil {
		return nil, err // ErrTooLarge comes here, before any allocation
	}
	if h.seq != r.seq {
		return nil, fmt.Errorf("%v frame has sequence %d, want %d (replayed, reordered or dropped): %w",
			h.typ, h.seq, r.seq, ErrAuth)
	}
	n := int(h.length)
	var p []byte
	var trailer int
	r.summedNow = false // readPages sets it
	switch {
	case r.aead != nil:
		p, trailer, err = r.readSealed(h)
	case r.plain:
		p, trailer, err = r.readCRC(h)
	default:
		p, trailer, err = r.readMAC(h)
	}
	if err != nil {
		return nil, err
	}
	if err := checkHeader(h, r.aead != nil); err != nil {
		return nil, err
	}
	r.seq++
	r.off += int64(headerSize + n + trailer)
	r.ctr.bytesReceived.Add(uint64(headerSize + n + trailer))
	r.ctr.framesReceived.Add(1)
	f := &r.cur.f
	f.seq, f.payload, f.zc, f.deltas = h.seq, p, r.zc, r.deltas
	if err := decodePayload(f, h.typ, p, &r.layout); err != nil {
		return nil, err
	}
	if err := r.trackState(f); err != nil {
		return nil, err
	}
	r.sumFrame(f)
	return f, nil
}

// trackState keeps the state a State frame's XOR chunk is taken against:
// the state of the last checkpoint that carried any (stateBase), built
// from the current checkpoint's chunks as they come (stateNext, which
// becomes the base at the End frame). A chunk that came as an XOR is
// made whole here, in place (its bytes are the slot's), before anything
// sums or stages it.
func (r *frameReader) trackState(f *frame) error {
	switch f.typ {
	case frameBegin:
		r.stateNext = r.stateNext[:0]
	case frameState:
		off := len(r.stateNext)
		if off+len(f.data) > MaxState {
			return fmt.Errorf("state of more than %d bytes in one checkpoint: %w", MaxState, ErrTooLarge)
		}
		if f.stateXOR {
			if off >= len(r.stateBase) {
				return fmt.Errorf("state frame: an XOR chunk at offset %d, past the last state's %d bytes: %w", off, len(r.stateBase), ErrFrame)
			}
			subtle.XORBytes(f.data, f.data, r.stateBase[off:]) // as far as the shorter reaches
		}
		r.stateNext = append(r.stateNext, f.data...)
	case frameEnd:
		if len(r.stateNext) > 0 {
			r.stateBase, r.stateNext = r.stateNext, r.stateBase[:0]
		}
	}
	return nil
}

// sumFrame keeps the running sum of the checkpoint's sections, as the
// sender's End frame sums them (docs/STREAM.md): a Begin frame starts it,
// each Pages, Disk and State frame that the sum covers (sums) adds its
// section, unless the read summed it already, and an End frame gets the
// sum of what came since its Begin (frame.sum), which the Receiver
// compares with the sender's. Frames outside a checkpoint, or in one
// that Run refuses, end the stream, so summing them does no harm.
func (r *frameReader) sumFrame(f *frame) {
	sealed := r.aead != nil
	switch f.typ {
	case frameBegin:
		r.secSum = newSum64()
	case framePages:
		if !r.summedNow && sums(sealed, codec(f.payload[0]) == codecStored) {
			r.secSum.Section(container.TypePages, f.section)
		}
	case frameDisk:
		if sums(sealed, codec(f.payload[0]) == codecStored) {
			r.secSum.Section(container.TypeDisk, f.section)
		}
	case frameState:
		// A chunk the reader made whole (decompressed, or XORed with
		// the last state) is more than its tag covers.
		if sums(sealed, codec(f.payload[0]) == codecStored && !f.stateXOR) {
			r.secSum.Section(container.TypeState, f.data)
		}
	case frameEnd:
		f.sum = r.secSum.Sum64()
	}
}

// scratch returns the current slot's buffer cut to size bytes, grown first when
// it is too small (to at least 64 KiB, so that small frames share one).
func (r *frameReader) scratch(size int) []byte {
	if cap(r.cur.buf) < size {
		r.cur.buf = make([]byte, size, max(size, 64<<10))
	}
	return r.cur.buf[:size]
}

// readSealed reads h's ciphertext and tag and opens them in place; it
// returns the payload and the trailer's size. A frame sealed in parts
// (h.split: sealedParts) is read and opened part by part, each where
// its plaintext belongs in the payload, its tag in the 16 bytes after
// it (where the next part then goes), so that the payload is one slice;
// part 0 says how the rest is cut (sealedParts).
func (r *frameReader) readSealed(h header) ([]byte, int, error) {
	n := int(h.length)
	if h.split != 0 || h.parts != 0 {
		return r.readSealedParts(h)
	}
	ct := r.scratch(n + tagSize)
	if _, err := io.ReadFull(r.br, ct[:n]); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame", err)
	}
	if _, err := io.ReadFull(r.br, ct[n:]); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame tag", err)
	}
	t0 := time.Now()
	p, err := r.aead.Open(ct[:0], frameNonce(r.aead, &r.nonce, h.seq), ct, r.hdr[:])
	r.ctr.openNanos.Add(int64(time.Since(t0)))
	if err != nil {
		return nil, 0, fmt.Errorf("%v frame %d: tag mismatch (corrupted or forged): %w", h.typ, h.seq, ErrAuth)
	}
	return p, tagSize, nil
}

// readSealedParts is readSealed for a frame sealed in parts.
func (r *frameReader) readSealedParts(h header) ([]byte, int, error) {
	n, split := int(h.length), int(h.split)
	if !h.splitOK() {
		// Only a forged or corrupted header says so: its sender never
		// does, and the header is what the tags authenticate.
		return nil, 0, fmt.Errorf("%v frame %d: split %d, %d parts, of %d bytes (corrupted or forged header): %w", h.typ, h.seq, split, h.parts, n, ErrAuth)
	}
	b := r.scratch(n + tagSize)
	if err := r.openPart(h, b[:split+tagSize], 0); err != nil {
		return nil, 0, err
	}
	var err error
	if r.parts, err = sealedParts(b[:split], n-split, r.parts[:0]); err != nil {
		return nil, 0, fmt.Errorf("%v frame %d: %w", h.typ, h.seq, err)
	}
	if len(r.parts) != int(h.parts) {
		return nil, 0, fmt.Errorf("%v frame %d: sealed in %d data parts, its section has %d runs: %w", h.typ, h.seq, h.parts, len(r.parts), ErrFrame)
	}
	off := split
	for i, k := range r.parts {
		if err := r.openPart(h, b[off:off+k+tagSize], uint32(i+1)); err != nil {
			return nil, 0, err
		}
		off += k
	}
	return b[:n], h.trailer(), nil
}

// openPart reads part number part of a frame sealed in parts, its
// ciphertext and tag, into b, and opens it in place.
func (r *frameReader) openPart(h header, b []byte, part uint32) error {
	if _, err := io.ReadFull(r.br, b); err != nil {
		return truncated(fmt.Sprintf("%v frame part %d", h.typ, part), err)
	}
	t0 := time.Now()
	_, err := r.aead.Open(b[:0], partNonce(r.aead, &r.nonce, h.seq, part), b, r.hdr[:])
	r.ctr.openNanos.Add(int64(time.Since(t0)))
	if err != nil {
		return fmt.Errorf("%v frame %d part %d: tag mismatch (corrupted or forged): %w", h.typ, h.seq, part, ErrAuth)
	}
	return nil
}

// readCRC reads h's payload and its CRC32C trailer (a plain session) and
// checks them; it returns the payload and the trailer's size.
func (r *frameReader) readCRC(h header) ([]byte, int, error) {
	n := int(h.length)
	b := r.scratch(n + crcSize)
	if h.typ == framePages && n >= pagesHeader {
		if err := r.readPages(b[:n]); err != nil {
			return nil, 0, truncated(h.typ.String()+" frame", err)
		}
	} else if _, err := io.ReadFull(r.br, b[:n]); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame", err)
	}
	if _, err := io.ReadFull(r.br, b[n:]); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame crc", err)
	}
	p := b[:n]
	if frameCRC(h.typ, r.hdr[:], p) != binary.LittleEndian.Uint32(b[n:]) {
		return nil, 0, fmt.Errorf("%v frame %d: crc mismatch (corrupted): %w", h.typ, h.seq, ErrAuth)
	}
	return p, crcSize, nil
}

// readPages reads an unkeyed session's Pages frame payload into b. A
// stored section, which the sum covers (the CRC32C trailer does not), is
// summed as it arrives (readSummed); a compressed one, whose sum covers
// what it decompresses to, after decoding (sumFrame).
func (r *frameReader) readPages(b []byte) error {
	if _, err := io.ReadFull(r.br, b[:pagesHeader]); err != nil {
		return err
	}
	if codec(b[0]) != codecStored {
		_, err := io.ReadFull(r.br, b[pagesHeader:])
		return err
	}
	r.secSum.head(container.TypePages, len(b)-pagesHeader)
	if err := r.readSummed(b[pagesHeader:]); err != nil {
		return err
	}
	r.summedNow = true
	return nil
}

// readSummed fills b, and adds its whole 32-byte blocks to the sum right
// after each read has copied them in, then its tail: one pass fewer over
// the bytes than a sum after the read (a Pages frame is 1 MiB, more than
// this host's L2 cache). What the sum adds does not depend on how the
// reads cut b. Like io.ReadFull, a short read is io.ErrUnexpectedEOF.
func (r *frameReader) readSummed(b []byte) error {
	got, summed := 0, 0
	for got < len(b) {
		k, err := r.br.Read(b[got:])
		got += k
		if full := (got - summed) &^ 31; full > 0 {
			r.secSum.blocks(b[summed : summed+full])
			summed += full
		}
		if err != nil && got < len(b) {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	r.secSum.tail(b[summed:])
	return nil
}

// readMAC reads h's payload and its HMAC trailer (before the session is
// keyed) and checks them; it returns the payload and the trailer's size.
func (r *frameReader) readMAC(h header) ([]byte, int, error) {
	p := r.scratch(int(h.length))
	if _, err := io.ReadFull(r.br, p); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame", err)
	}
	if _, err := io.ReadFull(r.br, r.sum[:]); err != nil {
		return nil, 0, truncated(h.typ.String()+" frame mac", err)
	}
	r.mac.Reset()
	r.mac.Write(r.hdr[:])
	r.mac.Write(p)
	if !hmac.Equal(r.mac.Sum(r.want[:0]), r.sum[:]) {
		return nil, 0, fmt.Errorf("%v frame %d: mac mismatch (corrupted or forged): %w", h.typ, h.seq, ErrAuth)
	}
	return p, macSize, nil
}

func truncated(what string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("connection ended inside %s: %w", what, ErrTruncated)
	}
	// The peer's host or process died (a SIGKILLed process with unread
	// data resets its connections): the stream ends as truncated, which
	// is what a standby's failure detection acts on.
	if connectionLost(err) {
		return fmt.Errorf("read %s: connection lost (%v): %w", what, err, ErrTruncated)
	}
	return fmt.Errorf("read %s: %w", what, err)
}

// connectionLost reports whether err says the connection died under us
// (reset, broken, unreachable), as opposed to a local close or a stall.
func connectionLost(err error) bool {
	for _, e := range []error{syscall.ECONNRESET, syscall.EPIPE, syscall.ECONNABORTED, syscall.ETIMEDOUT, syscall.EHOSTUNREACH, syscall.ENETUNREACH, io.ErrClosedPipe} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
