package stream

import (
	"encoding/binary"
	"fmt"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"govmm/vmm/container"
)

// Compression is how a sender compresses its Pages frames, and whether a
// receiver accepts compressed ones. The two ends agree on it in the
// handshake (see codecs in docs/STREAM.md): the sender announces the codec
// it wants, the receiver the codecs it accepts, and the session uses the
// sender's codec if the receiver accepts it, none otherwise.
type Compression uint8

const (
	// CompressDefault is DefaultCompression on a sender; a receiver
	// accepts every codec.
	CompressDefault Compression = iota
	// CompressNone sends page sections as they are; on a receiver, it
	// refuses compressed frames (it announces no codec).
	CompressNone
	// CompressS2 is klauspost/compress's S2 (block format): on the pages
	// we measured it compresses at about 0.9-1 GB/s per core, to 0.55-0.65
	// of raw on kernel and binary pages and to almost nothing on sparse
	// ones; the fastest of the codecs we measured (lz4 included), so the
	// one for links slower than about 1 GB/s.
	CompressS2
	// CompressZstd is zstd at its fastest level: 0.45-0.55 of raw on the
	// same pages, at a third of S2's speed; for links much slower than
	// that (a WAN).
	CompressZstd
)

// DefaultCompression is what a sender with the zero Config uses: none.
// On this project's loopback (a link faster than one core compresses),
// S2 halved the bytes of binary pages but doubled the time to ack at
// 4k and 64k dirty pages (bench checkpoint), so compression is a choice
// for slower links, not the default.
const DefaultCompression = CompressNone

// ParseCompression reads a --stream-compress value: none, s2 or zstd.
func ParseCompression(s string) (Compression, error) {
	switch s {
	case "none":
		return CompressNone, nil
	case "s2":
		return CompressS2, nil
	case "zstd":
		return CompressZstd, nil
	}
	return CompressDefault, fmt.Errorf("%w: stream compression %q: want none, s2 or zstd", ErrConfig, s)
}

// String is the --stream-compress value for c ("default" for the zero
// value).
func (c Compression) String() string {
	switch c {
	case CompressDefault:
		return "default"
	case CompressNone:
		return "none"
	case CompressS2:
		return "s2"
	case CompressZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression %d", uint8(c))
}

// codec is the byte a Pages frame starts with, and the hello flag bit
// (1 << codec) that announces it.
type codec uint8

const (
	codecStored codec = 0
	codecS2     codec = 1
	codecZstd   codec = 2

	// helloCodecFlags are the hello flags that announce codecs.
	helloCodecFlags = 1<<codecS2 | 1<<codecZstd
	// pagesHeader is a Pages frame's header in front of its data:
	// codec u8 | 0 [3] | section length u32.
	pagesHeader = 8
)

func (c Compression) codec() codec {
	switch c {
	case CompressS2:
		return codecS2
	case CompressZstd:
		return codecZstd
	}
	return codecStored
}

func (c codec) String() string {
	switch c {
	case codecStored:
		return "none"
	case codecS2:
		return "s2"
	case codecZstd:
		return "zstd"
	}
	return fmt.Sprintf("codec %d", uint8(c))
}

// negotiate is the session's codec: the sender's, if the receiver
// accepts it. Both ends compute it from the two hellos.
func negotiate(senderFlags, receiverFlags uint16) codec {
	want := senderFlags & helloCodecFlags
	if want == 0 || receiverFlags&want == 0 {
		return codecStored
	}
	for c := codecS2; c <= codecZstd; c++ {
		if want == 1<<c {
			return c
		}
	}
	return codecStored
}

// pageCodec compresses (sender) or decompresses (receiver) the page
// sections of one session. One goroutine uses it: the checkpoint
// goroutine on a sender, the reader on a receiver.
type pageCodec struct {
	c    codec
	buf  []byte // the compressed (sender) or decompressed (receiver) section
	zenc *zstd.Encoder
	zdec *zstd.Decoder
}

func newPageCodec(c codec) *pageCodec { return &pageCodec{c: c} }

// encode returns the Pages frame payload for section: compressed with the
// session's codec, or stored when that would not be smaller. The result
// is valid until the next call.
func (pc *pageCodec) encode(section []byte) []byte {
	if b, ok := pc.compress(section); ok {
		return b
	}
	b := putPagesHeader(pc.buf[:0], codecStored, len(section))
	pc.buf = append(b, section...)
	return pc.buf
}

// encodeFramed is encode for a section at framed[pagesHeader:], whose
// first pagesHeader bytes are free (container.PageSection.Framed): stored,
// the payload is framed itself with its header filled in, not a copy.
func (pc *pageCodec) encodeFramed(framed []byte) []byte {
	if b, ok := pc.compress(framed[pagesHeader:]); ok {
		return b
	}
	return pc.stored(framed)
}

// stored is encodeFramed without trying to compress.
func (pc *pageCodec) stored(framed []byte) []byte {
	putPagesHeader(framed[:0], codecStored, len(framed)-pagesHeader)
	return framed
}

// compress is the payload of section compressed with the session's
// codec, in the codec's buffer; ok is false when the session stores
// pages or compressing would not make them smaller.
func (pc *pageCodec) compress(section []byte) (b []byte, ok bool) {
	if pc.c == codecStored {
		return nil, false
	}
	if cap(pc.buf) < pagesHeader+s2.MaxEncodedLen(container.MaxPagesPayload) {
		pc.buf = make([]byte, 0, pagesHeader+s2.MaxEncodedLen(container.MaxPagesPayload))
	}
	b = putPagesHeader(pc.buf[:0], pc.c, len(section))
	switch pc.c {
	case codecS2:
		n := len(s2.Encode(b[pagesHeader:cap(b)], section))
		b = b[:pagesHeader+n]
	case codecZstd:
		if pc.zenc == nil {
			// Only fails on bad options.
			pc.zenc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest),
				zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
		}
		b = pc.zenc.EncodeAll(section, b)
	}
	pc.buf = b
	return b, len(b) < pagesHeader+len(section)
}

// putPagesHeader appends a Pages frame's header to b: codec c, a section
// of n bytes.
func putPagesHeader(b []byte, c codec, n int) []byte {
	b = append(b, byte(c), 0, 0, 0)
	return binary.LittleEndian.AppendUint32(b, uint32(n))
}

// decode returns the page section a Pages frame payload carries: p's
// data when stored, else decompressed into the codec's buffer (valid
// until the next call).
func (pc *pageCodec) decode(p []byte) ([]byte, error) { return pc.decodeInto(&pc.buf, p) }

// decodeInto is decodeFrame for a Pages frame.
func (pc *pageCodec) decodeInto(buf *[]byte, p []byte) ([]byte, error) {
	return pc.decodeFrame(framePages, buf, p)
}

// decodeFrame is decode of a Pages, Disk or State frame (t) into *buf (grown
// once to MaxPagesPayload, which a disk section's MaxDiskPayload is
// under), so that a receiver's reader can decompress the next frame while
// an earlier one is still staged. pc may be nil (stored sections only). A
// codec other than stored and the session's, a length over the frame
// type's cap, or data that does not decompress to exactly that length is
// ErrFrame; nothing is allocated beyond the cap.
func (pc *pageCodec) decodeFrame(t frameType, buf *[]byte, p []byte) ([]byte, error) {
	if len(p) < pagesHeader {
		return nil, fmt.Errorf("%v frame of %d bytes: %w", t, len(p), ErrFrame)
	}
	c, n := codec(p[0]), int(binary.LittleEndian.Uint32(p[4:]))
	data := p[pagesHeader:]
	session := codecStored
	if pc != nil {
		session = pc.c
	}
	limit, reserved := container.MaxPagesPayload, p[1:4]
	switch t {
	case frameDisk:
		limit = container.MaxDiskPayload
	case frameState:
		limit, reserved = MaxStateChunk, p[2:4] // p[1] is the chunk's base
	}
	switch {
	case !allZero(reserved):
		return nil, fmt.Errorf("%v frame: reserved bytes set: %w", t, ErrFrame)
	case t == frameState && p[1] > stateXOR:
		return nil, fmt.Errorf("state frame: unknown base %d: %w", p[1], ErrFrame)
	case t == frameState && n == 0:
		return nil, fmt.Errorf("state frame: empty chunk: %w", ErrFrame)
	case n > limit:
		return nil, fmt.Errorf("%v frame: section of %d bytes, at most %d: %w", t, n, limit, ErrTooLarge)
	case c != codecStored && c != session:
		return nil, fmt.Errorf("%v frame: %v, the session agreed on %v: %w", t, c, session, ErrFrame)
	case c == codecStored && len(data) != n:
		return nil, fmt.Errorf("%v frame: %d stored bytes, header says %d: %w", t, len(data), n, ErrFrame)
	case c == codecStored:
		return data, nil
	}
	if cap(*buf) < container.MaxPagesPayload {
		*buf = make([]byte, 0, container.MaxPagesPayload)
	}
	var out []byte
	var err error
	switch c {
	case codecS2:
		var dl int
		if dl, err = s2.DecodedLen(data); err == nil && dl != n {
			err = fmt.Errorf("decodes to %d bytes", dl)
		}
		if err == nil {
			out, err = s2.Decode((*buf)[:n], data)
		}
	case codecZstd:
		if pc.zdec == nil {
			pc.zdec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
				zstd.WithDecoderMaxMemory(container.MaxPagesPayload), zstd.WithDecoderMaxWindow(container.MaxPagesPayload))
		}
		out, err = pc.zdec.DecodeAll(data, (*buf)[:0])
	}
	if err == nil && len(out) != n {
		err = fmt.Errorf("decodes to %d bytes", len(out))
	}
	if err != nil {
		return nil, fmt.Errorf("%v frame: %v data does not decode to the %d bytes announced (%v): %w", t, c, n, err, ErrFrame)
	}
	return out, nil
}

// PageEncoder compresses page sections as a Sender does (benchmarks
// measure it on their own pages). One goroutine uses it.
type PageEncoder struct{ pc *pageCodec }

// NewPageEncoder returns an encoder for c (CompressDefault is
// DefaultCompression).
func NewPageEncoder(c Compression) *PageEncoder {
	if c == CompressDefault {
		c = DefaultCompression
	}
	return &PageEncoder{newPageCodec(c.codec())}
}

// Encode returns the Pages frame payload a Sender would send for the
// container page section: header and data, compressed or stored. It is
// valid until the next call.
func (e *PageEncoder) Encode(section []byte) []byte { return e.pc.encode(section) }
