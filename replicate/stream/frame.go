package stream

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"time"
)

// Version is the protocol version this package speaks. A peer with any
// other version is refused at the hello (ErrVersion); see docs/STREAM.md
// for the version policy.
const Version = 4

// helloMagic opens every Hello payload.
const helloMagic = "GOVMMSTR"

// frameType is the second header field.
type frameType uint8

const (
	frameHello     frameType = 1
	frameAuth      frameType = 2
	frameBegin     frameType = 3
	framePages     frameType = 4
	frameState     frameType = 5
	frameEnd       frameType = 6
	frameAck       frameType = 7
	frameHeartbeat frameType = 8
	frameError     frameType = 9
	frameGoodbye   frameType = 10
	frameDisk      frameType = 11
	frameAccept    frameType = 12
	frameHandover  frameType = 13
	lastFrameType            = frameHandover
)

var frameNames = [...]string{
	frameHello: "hello", frameAuth: "auth", frameBegin: "begin", framePages: "pages",
	frameState: "state", frameEnd: "end", frameAck: "ack", frameHeartbeat: "heartbeat",
	frameError: "error", frameGoodbye: "goodbye", frameDisk: "disk", frameAccept: "accept",
	frameHandover: "handover",
}

func (t frameType) String() string {
	if int(t) < len(frameNames) && frameNames[t] != "" {
		return frameNames[t]
	}
	return fmt.Sprintf("frame type %d", uint8(t))
}

// Kind says what a checkpoint is for. Kinds never go down on one stream:
// initial-sync rounds, then epochs, then at most one final checkpoint.
type Kind uint8

const (
	// KindInitialSync is a pre-copy round: memory only, nothing the
	// receiver can resume from.
	KindInitialSync Kind = 1
	// KindEpoch is a Remus epoch: a complete, resumable checkpoint.
	KindEpoch Kind = 2
	// KindFinal ends a migration or planned handover; it is resumable and
	// nothing but heartbeats and a goodbye may follow it.
	KindFinal Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindInitialSync:
		return "initial-sync"
	case KindEpoch:
		return "epoch"
	case KindFinal:
		return "final"
	}
	return fmt.Sprintf("kind %d", uint8(k))
}

// Resumable reports whether a committed checkpoint of this kind is a point
// the receiver can resume the guest from.
func (k Kind) Resumable() bool { return k == KindEpoch || k == KindFinal }

// Encoding says how one page travels in a Pages frame.
type Encoding uint8

const (
	// EncRaw: PageSize bytes.
	EncRaw Encoding = 0
	// EncZero: an all-zero page; no bytes.
	EncZero Encoding = 1
	// EncXORRLE is reserved for a later version: the page XORed with the
	// version last shipped on this stream, run-length encoded. Versions 1
	// and 2 refuse it.
	EncXORRLE Encoding = 2
)

// Wire sizes and hard caps. Every length is checked against its cap before
// anything is allocated for it.
const (
	headerSize    = 16
	macSize       = sha256.Size // handshake frames' trailer; Auth proofs
	tagSize       = 16          // session frames' trailer: the AES-GCM tag
	nonceSize     = 32
	pageEntrySize = 16 // gpa u64, encoding u8, reserved [3]u8, length u32

	// MaxPagesPerFrame caps the entries in one Pages frame.
	MaxPagesPerFrame = 256
	// MaxStateChunk caps the bytes in one State frame.
	MaxStateChunk = 1 << 20
	// MaxFramePayload caps every frame's payload: a full Pages frame of
	// raw pages is the largest legal one.
	MaxFramePayload = 4 + MaxPagesPerFrame*(pageEntrySize+PageSize)
	// MaxState caps the machine state of one checkpoint.
	MaxState = 64 << 20
	// MaxDiskChunk caps the bytes one Disk frame writes (or zeroes).
	MaxDiskChunk = 1 << 20
	// MaxCheckpointDisk caps the disk bytes one checkpoint writes, over
	// all its Disk frames: what a standby stages in memory at most.
	MaxCheckpointDisk = 256 << 20
	// MaxDisks caps the disk numbers in Disk frames.
	MaxDisks = 64
	// MaxErrorMessage caps an Error frame's text.
	MaxErrorMessage = 1024

	diskHeaderSize = 16 // disk u16, flags u16, length u32, offset u64
	diskFlagZero   = 1 << 0

	helloFixed = 8 + 2 + 2 + 1 + 3 + nonceSize + 16
)

// Role is which end of the stream a hello comes from.
type role uint8

const (
	roleSender   role = 1
	roleReceiver role = 2
)

const helloFlagKeyed = 1 << 0

// hello is the handshake's first message in each direction.
type hello struct {
	version uint16
	keyed   bool
	role    role
	nonce   [nonceSize]byte
	// heartbeat and timeout are this end's heartbeat interval and failover
	// timeout: the two ends agree on the larger timeout.
	heartbeat, timeout time.Duration
	id                 Identity
}

type pageEntry struct {
	gpa  GPA
	enc  Encoding
	data []byte // PageSize bytes for EncRaw, nil for EncZero; aliases the read buffer
}

type endInfo struct {
	epoch     uint64
	pages     uint64
	stateLen  uint64
	diskBytes uint64
	crc       uint32
}

// diskWrite is one decoded Disk frame.
type diskWrite struct {
	disk   int
	off    int64
	length int
	zero   bool
	data   []byte // length bytes unless zero; aliases the read buffer
}

// frame is one decoded frame. The reader reuses it: slices alias the read
// buffer and are valid until the next frame.
type frame struct {
	typ     frameType
	seq     uint64
	payload []byte // the raw payload
	hello   hello
	proof   [macSize]byte
	epoch   uint64 // begin, ack
	kind    Kind
	pages   []pageEntry
	data    []byte // state chunk, error message
	end     endInfo
	disk    diskWrite
	code    errorCode
	time    int64 // heartbeat: sender's clock, unix nanoseconds
}

// header is the fixed part in front of each payload.
type header struct {
	length uint32
	typ    frameType
	seq    uint64
}

func putHeader(b []byte, h header) {
	binary.LittleEndian.PutUint32(b[0:], h.length)
	b[4] = byte(h.typ)
	b[5], b[6], b[7] = 0, 0, 0
	binary.LittleEndian.PutUint64(b[8:], h.seq)
}

// parseHeader reads the header and checks its length against the cap:
// that much must be trusted before the MAC or tag can be read. The other
// fields are checked by checkHeader once the frame has authenticated, so
// that any tampering outside the length reads as what it is, ErrAuth.
func parseHeader(b []byte) (header, error) {
	h := header{
		length: binary.LittleEndian.Uint32(b[0:]),
		typ:    frameType(b[4]),
		seq:    binary.LittleEndian.Uint64(b[8:]),
	}
	if h.length > MaxFramePayload {
		return h, fmt.Errorf("frame of %d bytes, at most %d: %w", h.length, MaxFramePayload, ErrTooLarge)
	}
	return h, nil
}

func checkHeader(b []byte, h header) error {
	if b[5] != 0 || b[6] != 0 || b[7] != 0 {
		return fmt.Errorf("frame header: reserved bytes set: %w", ErrFrame)
	}
	if h.typ < frameHello || h.typ > lastFrameType {
		return fmt.Errorf("unknown %v: %w", h.typ, ErrFrame)
	}
	return nil
}

// decodePayload decodes p as a frame of type t into f. layout is the
// sender's announced layout, against which page addresses are checked.
// Nothing is allocated except, once, f.pages' backing array. (Long, on
// purpose: one case per frame type, each checking its fields in wire
// order against their caps, so that a reader checks it against
// docs/STREAM.md in one place.)
func decodePayload(f *frame, t frameType, p []byte, layout *Identity) error {
	f.typ = t
	fixed := func(n int) error {
		if len(p) != n {
			return fmt.Errorf("%v frame: %d bytes, want %d: %w", t, len(p), n, ErrFrame)
		}
		return nil
	}
	le := binary.LittleEndian
	switch t {
	case frameHello:
		return decodeHello(&f.hello, p)
	case frameAuth:
		if err := fixed(macSize); err != nil {
			return err
		}
		copy(f.proof[:], p)
	case frameBegin:
		if err := fixed(16); err != nil {
			return err
		}
		f.epoch, f.kind = le.Uint64(p), Kind(p[8])
		if f.kind < KindInitialSync || f.kind > KindFinal {
			return fmt.Errorf("begin: unknown checkpoint %v: %w", f.kind, ErrFrame)
		}
		if !allZero(p[9:16]) {
			return fmt.Errorf("begin: reserved bytes set: %w", ErrFrame)
		}
		if f.epoch == 0 {
			return fmt.Errorf("begin: epoch 0: %w", ErrFrame)
		}
	case framePages:
		return decodePages(f, p, layout)
	case frameState:
		if len(p) == 0 || len(p) > MaxStateChunk {
			return fmt.Errorf("state chunk of %d bytes, want 1..%d: %w", len(p), MaxStateChunk, ErrFrame)
		}
		f.data = p
	case frameEnd:
		if err := fixed(40); err != nil {
			return err
		}
		f.end = endInfo{epoch: le.Uint64(p), pages: le.Uint64(p[8:]), stateLen: le.Uint64(p[16:]),
			diskBytes: le.Uint64(p[24:]), crc: le.Uint32(p[32:])}
		if !allZero(p[36:40]) {
			return fmt.Errorf("end: reserved bytes set: %w", ErrFrame)
		}
		if f.end.stateLen > MaxState {
			return fmt.Errorf("end: state of %d bytes, at most %d: %w", f.end.stateLen, MaxState, ErrTooLarge)
		}
		if f.end.diskBytes > MaxCheckpointDisk {
			return fmt.Errorf("end: %d disk bytes, at most %d: %w", f.end.diskBytes, MaxCheckpointDisk, ErrTooLarge)
		}
	case frameDisk:
		return decodeDisk(&f.disk, p)
	case frameAck:
		if err := fixed(8); err != nil {
			return err
		}
		f.epoch = le.Uint64(p)
	case frameHeartbeat:
		if err := fixed(8); err != nil {
			return err
		}
		f.time = int64(le.Uint64(p))
	case frameError:
		if len(p) < 4 {
			return fmt.Errorf("error frame: %d bytes: %w", len(p), ErrFrame)
		}
		f.code = errorCode(le.Uint16(p))
		n := int(le.Uint16(p[2:]))
		if n > MaxErrorMessage {
			return fmt.Errorf("error message of %d bytes, at most %d: %w", n, MaxErrorMessage, ErrTooLarge)
		}
		if len(p) != 4+n {
			return fmt.Errorf("error frame: %d bytes, message says %d: %w", len(p), 4+n, ErrFrame)
		}
		f.data = p[4:]
	case frameGoodbye, frameAccept, frameHandover:
		return fixed(0)
	default:
		return fmt.Errorf("unknown %v: %w", t, ErrFrame)
	}
	return nil
}

func decodeDisk(w *diskWrite, p []byte) error {
	le := binary.LittleEndian
	if len(p) < diskHeaderSize {
		return fmt.Errorf("disk frame: %d bytes: %w", len(p), ErrFrame)
	}
	disk, flags, n, off := le.Uint16(p), le.Uint16(p[2:]), le.Uint32(p[4:]), le.Uint64(p[8:])
	*w = diskWrite{disk: int(disk), off: int64(off), length: int(n), zero: flags&diskFlagZero != 0}
	switch {
	case flags&^diskFlagZero != 0:
		return fmt.Errorf("disk frame: unknown flags %#x: %w", flags, ErrFrame)
	case disk >= MaxDisks:
		return fmt.Errorf("disk frame: disk %d, at most %d disks: %w", disk, MaxDisks, ErrOutOfRange)
	case n == 0 || n > MaxDiskChunk:
		return fmt.Errorf("disk frame: %d bytes, want 1..%d: %w", n, MaxDiskChunk, ErrFrame)
	case off > math.MaxInt64-uint64(n):
		return fmt.Errorf("disk frame: offset %#x: %w", off, ErrOutOfRange)
	case w.zero && len(p) != diskHeaderSize:
		return fmt.Errorf("disk frame: zero run with %d data bytes: %w", len(p)-diskHeaderSize, ErrFrame)
	case !w.zero && len(p) != diskHeaderSize+int(n):
		return fmt.Errorf("disk frame: %d data bytes, header says %d: %w", len(p)-diskHeaderSize, n, ErrFrame)
	}
	if !w.zero {
		w.data = p[diskHeaderSize:]
	}
	return nil
}

func decodePages(f *frame, p []byte, layout *Identity) error {
	le := binary.LittleEndian
	if len(p) < 4 {
		return fmt.Errorf("pages frame: %d bytes: %w", len(p), ErrFrame)
	}
	n := int(le.Uint16(p))
	if n == 0 || n > MaxPagesPerFrame {
		return fmt.Errorf("pages frame with %d pages, want 1..%d: %w", n, MaxPagesPerFrame, ErrTooLarge)
	}
	if p[2] != 0 || p[3] != 0 {
		return fmt.Errorf("pages frame: reserved bytes set: %w", ErrFrame)
	}
	if cap(f.pages) < MaxPagesPerFrame {
		f.pages = make([]pageEntry, 0, MaxPagesPerFrame)
	}
	f.pages = f.pages[:0]
	off := 4
	for i := range n {
		if len(p)-off < pageEntrySize {
			return fmt.Errorf("pages frame: entry %d truncated: %w", i, ErrFrame)
		}
		e := p[off : off+pageEntrySize]
		gpa, enc, ln := GPA(le.Uint64(e)), Encoding(e[8]), le.Uint32(e[12:])
		off += pageEntrySize
		if e[9] != 0 || e[10] != 0 || e[11] != 0 {
			return fmt.Errorf("page %#x: reserved bytes set: %w", uint64(gpa), ErrFrame)
		}
		if layout == nil || !layout.Contains(gpa) {
			return fmt.Errorf("page %#x: outside the memory layout or unaligned: %w", uint64(gpa), ErrOutOfRange)
		}
		var data []byte
		switch enc {
		case EncRaw:
			if ln != PageSize {
				return fmt.Errorf("raw page %#x: %d bytes: %w", uint64(gpa), ln, ErrFrame)
			}
			if len(p)-off < PageSize {
				return fmt.Errorf("raw page %#x: truncated: %w", uint64(gpa), ErrFrame)
			}
			data = p[off : off+PageSize : off+PageSize]
			off += PageSize
		case EncZero:
			if ln != 0 {
				return fmt.Errorf("zero page %#x: %d bytes: %w", uint64(gpa), ln, ErrFrame)
			}
		default:
			return fmt.Errorf("page %#x: encoding %d not supported by version %d: %w", uint64(gpa), enc, Version, ErrFrame)
		}
		f.pages = append(f.pages, pageEntry{gpa: gpa, enc: enc, data: data})
	}
	if off != len(p) {
		return fmt.Errorf("pages frame: %d trailing bytes: %w", len(p)-off, ErrFrame)
	}
	return nil
}

func appendBegin(b []byte, epoch uint64, k Kind) []byte {
	b = binary.LittleEndian.AppendUint64(b, epoch)
	return append(b, byte(k), 0, 0, 0, 0, 0, 0, 0)
}

func appendEnd(b []byte, e endInfo) []byte {
	le := binary.LittleEndian
	b = le.AppendUint64(b, e.epoch)
	b = le.AppendUint64(b, e.pages)
	b = le.AppendUint64(b, e.stateLen)
	b = le.AppendUint64(b, e.diskBytes)
	b = le.AppendUint32(b, e.crc)
	return append(b, 0, 0, 0, 0)
}

// appendDisk appends a Disk payload: data at off on disk, or, with data
// nil, a run of n zero bytes.
func appendDisk(b []byte, disk int, off int64, n int, data []byte) []byte {
	le := binary.LittleEndian
	var flags uint16
	if data == nil {
		flags = diskFlagZero
	}
	b = le.AppendUint16(b, uint16(disk))
	b = le.AppendUint16(b, flags)
	b = le.AppendUint32(b, uint32(n))
	b = le.AppendUint64(b, uint64(off))
	return append(b, data...)
}

func appendError(b []byte, code errorCode, msg string) []byte {
	if len(msg) > MaxErrorMessage {
		msg = msg[:MaxErrorMessage]
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(code))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// appendPageEntry appends one page to a Pages payload.
func appendPageEntry(b []byte, gpa GPA, enc Encoding, data []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, uint64(gpa))
	b = append(b, byte(enc), 0, 0, 0)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
