package stream

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"

	"govmm/vmm/container"
)

// Version is the protocol version this package speaks. A peer with any
// other version is refused at the hello (ErrVersion); see docs/STREAM.md
// for the version policy.
const Version = 17

// checkpointVersion is the version of the GOVMMCKP container that a
// checkpoint is (docs/FORMATS.md): its Begin frame stands for the
// container's header, each Pages, Disk and State frame carries one
// section's payload. The End frame carries the stream's own checksum of
// those sections (sum64), not the container's CRC32C (version 9); in a
// keyed session, of the compressed ones only (version 10).
// The stream's version fixes it, so it never travels.
const checkpointVersion = 1

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

// Wire sizes and hard caps. Every length is checked against its cap before
// anything is allocated for it.
const (
	headerSize = 16
	macSize    = sha256.Size // handshake frames' trailer; Auth proofs
	tagSize    = 16          // session frames' trailer: the AES-GCM tag
	nonceSize  = 32

	// MaxPagesPerFrame caps the entries in one Pages frame: one full
	// container page section.
	MaxPagesPerFrame = container.MaxPagesPerSection
	// MaxStateChunk caps the bytes in one State frame.
	MaxStateChunk = 1 << 20

	// A State frame's base (its payload's second byte, version 13) says
	// what its chunk's bytes are: the state itself (stateWhole), or
	// their XOR with the state of the last checkpoint that carried state
	// on this stream, at the same offsets (stateXOR; bytes past that
	// state's end as they are). A Sender XORs only to compress: most of
	// a machine's state (CPUID, MSRs, the local APIC, most devices) is
	// the same from one epoch to the next, so the XOR is mostly zeros.
	stateWhole = 0
	stateXOR   = 1
	// MaxFramePayload caps every frame's payload: a full Pages frame of
	// raw pages, stored, is the largest legal one.
	MaxFramePayload = pagesHeader + container.MaxPagesPayload
	// MaxState caps the machine state of one checkpoint.
	MaxState = 64 << 20
	// MaxDiskChunk caps the bytes one Disk frame writes (or zeroes): a
	// container disk section's cap.
	MaxDiskChunk = container.MaxDiskChunk
	// MaxCheckpointDisk caps what one checkpoint's Disk frames cost, over
	// all of them: what a standby stages in memory at most. A frame with
	// data costs its length, a zero run ZeroRunCost (DiskCost).
	MaxCheckpointDisk = 256 << 20
	// ZeroRunCost is what a Disk frame without data (a zero run of at
	// most MaxDiskChunk bytes) costs toward MaxCheckpointDisk: the
	// standby stages the run, not its zeros (version 11; before, a run
	// cost its length, so a guest's discard of its whole disk, or a
	// hole, filled a checkpoint as data would).
	ZeroRunCost = 64
	// MaxDisks caps the disk numbers in Disk frames.
	MaxDisks = 64
	// MaxErrorMessage caps an Error frame's text.
	MaxErrorMessage = 1024

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
	// codecs are the hello's codec flags (1 << codec): the one codec a
	// sender wants, the codecs a receiver accepts.
	codecs  uint16
	deltas  bool // this end takes deltas
	aegis   bool // this end seals with AEGIS-128L (keyed hellos only)
	aegisX2 bool // this end seals with AEGIS-128X2 (keyed hellos only)
	role    role
	nonce   [nonceSize]byte
	// heartbeat and timeout are this end's heartbeat interval and failover
	// timeout: the two ends agree on the larger timeout.
	heartbeat, timeout time.Duration
	id                 Identity
}

type endInfo struct {
	epoch     uint64
	pages     uint64
	stateLen  uint64
	diskBytes uint64 // written or zeroed, over all Disk frames
	sum       uint64 // sum64 of the checkpoint's sections
	// diskCost is the Disk frames' cost toward MaxCheckpointDisk (not on
	// the wire: each end counts its own).
	diskCost uint64
}

// diskCost is what a Disk frame of n bytes costs toward
// MaxCheckpointDisk: its length with data, ZeroRunCost as a zero run.
func diskCost(n int, zero bool) uint64 {
	if zero {
		return ZeroRunCost
	}
	return uint64(n)
}

// ZeroCost is what n bytes of zero runs cost toward MaxCheckpointDisk,
// sent as Sender.SendDiskZero sends them (Disk frames of at most
// MaxDiskChunk bytes).
func ZeroCost(n int64) uint64 {
	return uint64((n+MaxDiskChunk-1)/MaxDiskChunk) * ZeroRunCost
}

// frame is one decoded frame. The reader reuses it: slices alias the read
// buffer and are valid until the next frame.
type frame struct {
	typ     frameType
	seq     uint64
	payload []byte     // the raw payload
	section []byte     // pages, disk: the section, decompressed (what the checksum covers)
	secBuf  []byte     // pages, disk: where a compressed section is decompressed
	zc      *pageCodec // pages: the session's codec (nil: stored sections only)
	deltas  bool       // pages: the session agreed on deltas
	hello   hello
	proof   [macSize]byte
	epoch   uint64 // begin, ack
	kind    Kind
	pages   []container.Page // Data aliases the read buffer
	data    []byte           // state chunk (whole once the reader has it), error message
	// stateXOR says the state chunk came as the XOR of its bytes with
	// the last checkpoint's state at the same offsets.
	stateXOR bool
	end      endInfo
	sum      uint64              // end: sum64 of the checkpoint's sections as received (frameReader.sumFrame)
	disk     container.DiskWrite // Data aliases the read buffer
	code     errorCode
	time     int64 // heartbeat: sender's clock, unix nanoseconds
}

// header is the fixed part in front of each payload.
type header struct {
	length uint32
	typ    frameType
	// split and parts, in a keyed session's Pages frame (version 15),
	// say its payload was sealed in parts (sealedParts): its first split
	// bytes, then parts runs of its section's data, each an AEAD message
	// of its own, so that the frame's length on the wire is the header,
	// the payload and 1+parts tags. Both 0, as everywhere else, say one
	// message. They are the header's 3 bytes after the type (split u16,
	// parts u8), which were reserved (zero) before.
	split uint16
	parts uint8
	seq   uint64
}

// maxSplit is the largest split a header holds.
const maxSplit = math.MaxUint16

// maxParts is the most data parts a frame sealed in parts has: runs
// between zero pages, at most one for every two entries.
const maxParts = (MaxPagesPerFrame + 1) / 2

func putHeader(b []byte, h header) {
	binary.LittleEndian.PutUint32(b[0:], h.length)
	b[4] = byte(h.typ)
	binary.LittleEndian.PutUint16(b[5:], h.split)
	b[7] = h.parts
	binary.LittleEndian.PutUint64(b[8:], h.seq)
}

// trailer is the size of what follows a keyed session's frame's
// payload: its tags.
func (h header) trailer() int { return (1 + int(h.parts)) * tagSize }

// parseHeader reads the header and checks its length against the cap:
// that much must be trusted before the MAC or tag can be read. The other
// fields are checked by checkHeader once the frame has authenticated, so
// that any tampering outside the length reads as what it is, ErrAuth.
func parseHeader(b []byte) (header, error) {
	h := header{
		length: binary.LittleEndian.Uint32(b[0:]),
		typ:    frameType(b[4]),
		split:  binary.LittleEndian.Uint16(b[5:]),
		parts:  b[7],
		seq:    binary.LittleEndian.Uint64(b[8:]),
	}
	if h.length > MaxFramePayload {
		return h, fmt.Errorf("frame of %d bytes, at most %d: %w", h.length, MaxFramePayload, ErrTooLarge)
	}
	return h, nil
}

// sealedParts returns, after dst, the lengths of the data parts of a
// keyed session's Pages frame sealed in parts (version 15), from its
// part 0, head (the frame's first split bytes, opened), and the data's
// length (the rest of the payload). Such a frame carries a stored,
// grouped page section (container.SectionGrouped); part 0 is its Pages
// header and the section up to the entries' data, and every maximal run
// of consecutive entries with data (length > 0: not zero pages) is a
// part of its own, their data back to back. A sender that staged its
// pages one after the other, as replicate does, finds each part lying in
// one piece of its memory and seals it from there; the zero pages
// between runs are where its pieces break.
func sealedParts(head []byte, data int, dst []int) ([]int, error) {
	le := binary.LittleEndian
	if len(head) < pagesHeader+4 || codec(head[0]) != codecStored || head[1]|head[2]|head[3] != 0 {
		return dst, fmt.Errorf("sealed in parts: not a stored section's head: %w", ErrFrame)
	}
	sec := head[pagesHeader:]
	count, flags := int(le.Uint16(sec)), le.Uint16(sec[2:])
	switch {
	case int(le.Uint32(head[4:])) != len(sec)+data:
		return dst, fmt.Errorf("sealed in parts: section of %d bytes, frame carries %d: %w", le.Uint32(head[4:]), len(sec)+data, ErrFrame)
	case flags != container.SectionGrouped || count == 0 || count > MaxPagesPerFrame:
		return dst, fmt.Errorf("sealed in parts: section of %d entries, flags %#x, want grouped: %w", count, flags, ErrFrame)
	case len(sec) != container.GroupedDataOffset(count):
		return dst, fmt.Errorf("sealed in parts: split %d, want %d for %d entries: %w", len(head), pagesHeader+container.GroupedDataOffset(count), count, ErrFrame)
	}
	run, sum := 0, 0
	for i := range count {
		k := int(le.Uint32(sec[4+i*container.PageEntrySize+12:]))
		if k > container.XORSize {
			return dst, fmt.Errorf("sealed in parts: entry %d of %d bytes: %w", i, k, ErrFrame)
		}
		if k == 0 && run > 0 {
			dst = append(dst, run)
			run = 0
		}
		run += k
		sum += k
	}
	if run > 0 {
		dst = append(dst, run)
	}
	if sum != data {
		return dst, fmt.Errorf("sealed in parts: entries hold %d bytes of data, frame carries %d: %w", sum, data, ErrFrame)
	}
	return dst, nil
}

// checkHeader checks what parseHeader left: the type, and that only a
// sealed session's Pages frame is sealed in parts (sealed: the frame was
// read as one).
func checkHeader(h header, sealed bool) error {
	if (h.split != 0 || h.parts != 0) && (!sealed || !h.splitOK()) {
		return fmt.Errorf("%v frame: split %d, %d parts, of %d bytes (reserved bytes set): %w", h.typ, h.split, h.parts, h.length, ErrFrame)
	}
	if h.typ < frameHello || h.typ > lastFrameType {
		return fmt.Errorf("unknown %v: %w", h.typ, ErrFrame)
	}
	return nil
}

// splitOK says whether h's split and parts are those of a frame sealed
// in parts: a Pages frame with a part 0 and at least one data part.
func (h header) splitOK() bool {
	return h.typ == framePages && h.split != 0 && h.parts != 0 && int(h.parts) <= maxParts && uint32(h.split) < h.length
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
		section, err := f.zc.decodeInto(&f.secBuf, p)
		if err != nil {
			return err
		}
		f.section = section
		return decodePages(f, section, layout)
	case frameState:
		chunk, err := f.zc.decodeFrame(frameState, &f.secBuf, p)
		if err != nil {
			return err
		}
		// A chunk against the last state is made whole by the reader,
		// which holds that state (frameReader.unXORState).
		f.data, f.stateXOR = chunk, p[1] == stateXOR
	case frameEnd:
		if err := fixed(40); err != nil {
			return err
		}
		f.end = endInfo{epoch: le.Uint64(p), pages: le.Uint64(p[8:]), stateLen: le.Uint64(p[16:]),
			diskBytes: le.Uint64(p[24:]), sum: le.Uint64(p[32:])}
		if f.end.stateLen > MaxState {
			return fmt.Errorf("end: state of %d bytes, at most %d: %w", f.end.stateLen, MaxState, ErrTooLarge)
		}
	case frameDisk:
		section, err := f.zc.decodeFrame(frameDisk, &f.secBuf, p)
		if err != nil {
			return err
		}
		f.section = section
		return decodeDisk(&f.disk, section)
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

// decodeDisk decodes a Disk frame: a container disk section, whose disk
// number and range the stream checks.
func decodeDisk(w *container.DiskWrite, p []byte) error {
	var err error
	if *w, err = container.ParseDisk(p); err != nil {
		return fmt.Errorf("disk frame: %w", sectionErr(err))
	}
	switch {
	case w.Disk >= MaxDisks:
		return fmt.Errorf("disk frame: disk %d, at most %d disks: %w", w.Disk, MaxDisks, ErrOutOfRange)
	case w.Off > math.MaxInt64-uint64(w.Length):
		return fmt.Errorf("disk frame: offset %#x: %w", w.Off, ErrOutOfRange)
	}
	return nil
}

// decodePages decodes a Pages frame's page section (once decompressed): a
// container page section, each of whose pages must lie inside the
// sender's announced layout.
func decodePages(f *frame, p []byte, layout *Identity) error {
	if cap(f.pages) < MaxPagesPerFrame {
		f.pages = make([]container.Page, 0, MaxPagesPerFrame)
	}
	var err error
	parse := container.ParsePages
	if f.deltas {
		parse = container.ParsePagesDeltas
	}
	if f.pages, err = parse(p, f.pages); err != nil {
		return fmt.Errorf("pages frame: %w", sectionErr(err))
	}
	for _, pg := range f.pages {
		if layout == nil || !layout.Contains(GPA(pg.GPA)) {
			return fmt.Errorf("page %#x: outside the memory layout: %w", pg.GPA, ErrOutOfRange)
		}
	}
	return nil
}

// sectionErr wraps a container section's refusal in the stream's
// sentinel for it.
func sectionErr(err error) error {
	if errors.Is(err, container.ErrTooLarge) {
		return fmt.Errorf("%w: %w", err, ErrTooLarge)
	}
	return fmt.Errorf("%w: %w", err, ErrFrame)
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
	return le.AppendUint64(b, e.sum)
}

func appendError(b []byte, code errorCode, msg string) []byte {
	if len(msg) > MaxErrorMessage {
		msg = msg[:MaxErrorMessage]
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(code))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
