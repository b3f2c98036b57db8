package witness

import (
	"encoding/binary"
	"fmt"
	"time"
	"unicode"
	"unicode/utf8"
)

// Version is the witness protocol version. A peer with another version is
// refused at the hello (ErrVersion).
const Version = 1

const helloMagic = "GOVMMWIT"

// Wire sizes and caps; every length is checked against its cap before
// anything is allocated for it.
const (
	headerSize = 16
	tagSize    = 16 // AES-GCM tag of session frames
	nonceSize  = 32
	proofSize  = 32
	helloSize  = 8 + 2 + 1 + 1 + nonceSize

	// MaxPayload caps every frame's payload.
	MaxPayload = 2048
	// MaxName caps a VM name and a holder name, in bytes.
	MaxName = 256
	// MaxMessage caps an error text.
	MaxMessage = 1024

	requestFixed = 24
	replyFixed   = 40
)

type frameType uint8

const (
	frameHello   frameType = 1
	frameAuth    frameType = 2
	frameRequest frameType = 3
	frameReply   frameType = 4
	frameError   frameType = 5
)

func (t frameType) String() string {
	switch t {
	case frameHello:
		return "hello"
	case frameAuth:
		return "auth"
	case frameRequest:
		return "request"
	case frameReply:
		return "reply"
	case frameError:
		return "error"
	}
	return fmt.Sprintf("frame type %d", uint8(t))
}

// header is the clear part of every frame: length u32 | type u8 | 0 [3] |
// seq u64. Length is the plaintext payload's.
type header struct {
	length uint32
	typ    frameType
	seq    uint64
}

func putHeader(b []byte, h header) {
	binary.LittleEndian.PutUint32(b[0:], h.length)
	b[4], b[5], b[6], b[7] = byte(h.typ), 0, 0, 0
	binary.LittleEndian.PutUint64(b[8:], h.seq)
}

func parseHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, fmt.Errorf("frame header: %d bytes, want %d: %w", len(b), headerSize, ErrProtocol)
	}
	h := header{length: binary.LittleEndian.Uint32(b[0:]), typ: frameType(b[4]), seq: binary.LittleEndian.Uint64(b[8:])}
	if b[5]|b[6]|b[7] != 0 {
		return header{}, fmt.Errorf("frame header: reserved bytes not zero: %w", ErrProtocol)
	}
	if h.typ < frameHello || h.typ > frameError {
		return header{}, fmt.Errorf("frame header: unknown %v: %w", h.typ, ErrProtocol)
	}
	if h.length > MaxPayload {
		return header{}, fmt.Errorf("%v frame: payload %d bytes, at most %d: %w", h.typ, h.length, MaxPayload, ErrProtocol)
	}
	return h, nil
}

type role uint8

const (
	roleClient  role = 1
	roleWitness role = 2
)

// hello: "GOVMMWIT" | version u16 | role u8 | 0 u8 | nonce [32].
type hello struct {
	version uint16
	role    role
	nonce   [nonceSize]byte
}

func appendHello(b []byte, h *hello) []byte {
	b = append(b, helloMagic...)
	b = binary.LittleEndian.AppendUint16(b, h.version)
	b = append(b, byte(h.role), 0)
	return append(b, h.nonce[:]...)
}

// parseHello decodes a hello of any version far enough for the caller to
// refuse another version by name.
func parseHello(p []byte) (hello, error) {
	var h hello
	if len(p) < 10 || string(p[:8]) != helloMagic {
		return h, fmt.Errorf("hello: not a govmm witness peer: %w", ErrProtocol)
	}
	h.version = binary.LittleEndian.Uint16(p[8:])
	if h.version != Version {
		return h, fmt.Errorf("hello: peer speaks version %d, this side %d: %w", h.version, Version, ErrVersion)
	}
	if len(p) != helloSize {
		return h, fmt.Errorf("hello: %d bytes, want %d: %w", len(p), helloSize, ErrProtocol)
	}
	h.role = role(p[10])
	if h.role != roleClient && h.role != roleWitness {
		return h, fmt.Errorf("hello: role %d: %w", h.role, ErrProtocol)
	}
	if p[11] != 0 {
		return h, fmt.Errorf("hello: reserved byte not zero: %w", ErrProtocol)
	}
	copy(h.nonce[:], p[12:])
	return h, nil
}

// Operations a client asks for.
type op uint8

const (
	// opAcquire asks for a new generation. Without flagBase: current+1,
	// once no lease is valid (a primary starting protection). With
	// flagBase and gen = base: base+1, only if base is current and its
	// lease ran out (a standby's claim) or the asker holds base (the
	// holder advancing its own generation).
	opAcquire op = 1
	opRenew   op = 2 // extend the lease on gen (the asker's)
	opResign  op = 3 // end the lease on gen now (handover)
	opStatus  op = 4 // the VM's record
)

const flagBase = 1 << 0

func (o op) String() string {
	switch o {
	case opAcquire:
		return "acquire"
	case opRenew:
		return "renew"
	case opResign:
		return "resign"
	case opStatus:
		return "status"
	}
	return fmt.Sprintf("op %d", uint8(o))
}

// request: op u8 | flags u8 | 0 u16 | lease_ms u32 | id u64 | gen u64 |
// vm (u16 len, 1..256) | holder (u16 len, ≤256).
type request struct {
	op     op
	base   bool // flagBase
	lease  time.Duration
	id     uint64
	gen    uint64
	vm     string
	holder string
}

func appendString(b []byte, s string) []byte {
	b = binary.LittleEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendRequest(b []byte, r *request) []byte {
	var flags byte
	if r.base {
		flags |= flagBase
	}
	b = append(b, byte(r.op), flags, 0, 0)
	b = binary.LittleEndian.AppendUint32(b, durationMS(r.lease))
	b = binary.LittleEndian.AppendUint64(b, r.id)
	b = binary.LittleEndian.AppendUint64(b, r.gen)
	b = appendString(b, r.vm)
	return appendString(b, r.holder)
}

func durationMS(d time.Duration) uint32 {
	ms := d / time.Millisecond
	if ms > 1<<32-1 {
		return 1<<32 - 1
	}
	if ms < 0 {
		return 0
	}
	return uint32(ms)
}

// reader walks a payload; the first short read sticks.
type reader struct {
	p   []byte
	err error
}

func (r *reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n > len(r.p) {
		r.err = fmt.Errorf("truncated: need %d more bytes, have %d: %w", n, len(r.p), ErrProtocol)
		return nil
	}
	b := r.p[:n]
	r.p = r.p[n:]
	return b
}

func (r *reader) u8() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (r *reader) str(what string, max int) string {
	n := int(r.u16())
	if r.err == nil && n > max {
		r.err = fmt.Errorf("%s: %d bytes, at most %d: %w", what, n, max, ErrProtocol)
	}
	return string(r.take(n))
}

func (r *reader) zero(n int) {
	for _, c := range r.take(n) {
		if c != 0 && r.err == nil {
			r.err = fmt.Errorf("reserved bytes not zero: %w", ErrProtocol)
		}
	}
}

func (r *reader) end(what string) error {
	if r.err != nil {
		return fmt.Errorf("%s: %w", what, r.err)
	}
	if len(r.p) != 0 {
		return fmt.Errorf("%s: %d trailing bytes: %w", what, len(r.p), ErrProtocol)
	}
	return nil
}

// checkName accepts a VM or holder name: 1..MaxName bytes of UTF-8
// without control characters (names go into logs and the state file).
func checkName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > MaxName {
		return fmt.Errorf("%s: %d bytes, at most %d", what, len(s), MaxName)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s %q: not UTF-8", what, s)
	}
	for _, c := range s {
		if unicode.IsControl(c) {
			return fmt.Errorf("%s %q: control character", what, s)
		}
	}
	return nil
}

func parseRequest(p []byte) (request, error) {
	r := reader{p: p}
	var q request
	q.op = op(r.u8())
	flags := r.u8()
	r.zero(2)
	q.lease = time.Duration(r.u32()) * time.Millisecond
	q.id = r.u64()
	q.gen = r.u64()
	q.vm = r.str("vm name", MaxName)
	q.holder = r.str("holder", MaxName)
	if err := r.end("request"); err != nil {
		return request{}, err
	}
	if q.op < opAcquire || q.op > opStatus {
		return request{}, fmt.Errorf("request: unknown %v: %w", q.op, ErrProtocol)
	}
	if flags&^flagBase != 0 {
		return request{}, fmt.Errorf("request: unknown flags %#x: %w", flags, ErrProtocol)
	}
	q.base = flags&flagBase != 0
	if q.base && q.op != opAcquire {
		return request{}, fmt.Errorf("request: base flag on %v: %w", q.op, ErrProtocol)
	}
	if err := checkName("vm name", q.vm); err != nil {
		return request{}, fmt.Errorf("request: %v: %w", err, ErrProtocol)
	}
	if q.op != opStatus {
		if err := checkName("holder", q.holder); err != nil {
			return request{}, fmt.Errorf("request: %v: %w", err, ErrProtocol)
		}
	}
	if (q.op == opRenew || q.op == opResign) && q.gen == 0 {
		return request{}, fmt.Errorf("request: %v of generation 0: %w", q.op, ErrProtocol)
	}
	return q, nil
}

// Results of a request.
type result uint8

const (
	resultOK         result = 0 // granted, renewed, resigned, or the status
	resultHeld       result = 1 // another holder's lease is valid
	resultSuperseded result = 2 // the generation asked for is not current
	resultUnknown    result = 3 // no record of the VM, or of a generation this high
	resultError      result = 4 // bad request or state not persisted; see message
)

// reply: id u64 | result u8 | 0 [3] | lease_ms u32 | gen u64 |
// remaining_ns u64 | renewals u64 | holder (u16 len, ≤256) |
// message (u16 len, ≤1024).
type reply struct {
	id        uint64
	result    result
	lease     time.Duration
	gen       uint64
	remaining time.Duration
	renewals  uint64
	holder    string
	message   string
}

func appendReply(b []byte, r *reply) []byte {
	b = binary.LittleEndian.AppendUint64(b, r.id)
	b = append(b, byte(r.result), 0, 0, 0)
	b = binary.LittleEndian.AppendUint32(b, durationMS(r.lease))
	b = binary.LittleEndian.AppendUint64(b, r.gen)
	b = binary.LittleEndian.AppendUint64(b, uint64(max(r.remaining, 0)))
	b = binary.LittleEndian.AppendUint64(b, r.renewals)
	b = appendString(b, r.holder)
	msg := r.message
	if len(msg) > MaxMessage {
		msg = msg[:MaxMessage]
	}
	return appendString(b, msg)
}

func parseReply(p []byte) (reply, error) {
	r := reader{p: p}
	var a reply
	a.id = r.u64()
	a.result = result(r.u8())
	r.zero(3)
	a.lease = time.Duration(r.u32()) * time.Millisecond
	a.gen = r.u64()
	rem := r.u64()
	a.renewals = r.u64()
	a.holder = r.str("holder", MaxName)
	a.message = r.str("message", MaxMessage)
	if err := r.end("reply"); err != nil {
		return reply{}, err
	}
	if a.result > resultError {
		return reply{}, fmt.Errorf("reply: unknown result %d: %w", a.result, ErrProtocol)
	}
	if rem > uint64(maxLeaseCap) {
		return reply{}, fmt.Errorf("reply: remaining lease %dns beyond any lease: %w", rem, ErrProtocol)
	}
	a.remaining = time.Duration(rem)
	if a.holder != "" {
		if err := checkName("holder", a.holder); err != nil {
			return reply{}, fmt.Errorf("reply: %v: %w", err, ErrProtocol)
		}
	}
	if a.result == resultOK && a.gen != 0 && (a.lease < MinLease || a.lease > maxLeaseCap) {
		return reply{}, fmt.Errorf("reply: lease %v outside [%v, %v]: %w", a.lease, MinLease, maxLeaseCap, ErrProtocol)
	}
	return a, nil
}

// error frame: code u16 (0) | len u16 (≤1024) | message. Sent in clear
// when the handshake fails (the peer cannot be spoken to under a key), and
// sealed like any frame after it.
func appendErrorFrame(b []byte, msg string) []byte {
	if len(msg) > MaxMessage {
		msg = msg[:MaxMessage]
	}
	b = binary.LittleEndian.AppendUint16(b, 0)
	return appendString(b, msg)
}

func parseErrorFrame(p []byte) (string, error) {
	r := reader{p: p}
	r.zero(2)
	msg := r.str("error message", MaxMessage)
	if err := r.end("error frame"); err != nil {
		return "", err
	}
	return msg, nil
}
