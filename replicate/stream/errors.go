package stream

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
)

// Sentinels. Every error a Sender or Receiver returns for a failed stream is
// a *StreamError whose Err wraps exactly one of these (and, when the peer
// reported the failure, ErrPeer as well), so callers branch with errors.Is.
var (
	// ErrAuth: a key, proof or frame MAC did not verify, a frame arrived
	// out of sequence (replayed, reordered or dropped), one side has a
	// key and the other does not, or one side requires a cipher the other
	// does not offer (Config.Cipher).
	ErrAuth = errors.New("stream authentication failed")
	// ErrFrame: a frame is malformed (bad header, unknown type, bad field).
	ErrFrame = errors.New("malformed stream frame")
	// ErrTooLarge: a length exceeds its hard cap; refused before allocating.
	ErrTooLarge = errors.New("stream field too large")
	// ErrOutOfRange: a guest-physical address is unaligned or outside the
	// announced memory layout.
	ErrOutOfRange = errors.New("stream address out of range")
	// ErrVersion: the peer speaks another protocol version or is no govmm
	// stream at all.
	ErrVersion = errors.New("unsupported stream version")
	// ErrMismatch: the peer describes another VM (name, memory layout,
	// vCPUs or devices).
	ErrMismatch = errors.New("vm identity mismatch")
	// ErrProtocol: a frame is well formed but not allowed here (pages
	// outside a checkpoint, nested begin, epoch not increasing, ack out of
	// order).
	ErrProtocol = errors.New("stream protocol violation")
	// ErrChecksum: an EndCheckpoint does not match what was received (page
	// count, state length or CRC32C).
	ErrChecksum = errors.New("checkpoint verification failed")
	// ErrTruncated: the connection ended inside a frame, a checkpoint, or
	// without a goodbye.
	ErrTruncated = errors.New("stream truncated")
	// ErrTimeout: nothing was heard from the peer for the failover
	// timeout while this end was listening.
	ErrTimeout = errors.New("peer silent")
	// ErrStalled: the peer is alive but took none of this end's bytes for
	// the stall timeout.
	ErrStalled = errors.New("peer stalled")
	// ErrBusy: the receiver is already serving a sender (or not accepting
	// one now).
	ErrBusy = errors.New("receiver busy")
	// ErrRefused: the receiver's Verify refused the sender for a reason of
	// its own (it could not build a machine for it, say).
	ErrRefused = errors.New("sender refused")
	// ErrCommit: the receiver's commit callback or page sink refused the
	// checkpoint.
	ErrCommit = errors.New("checkpoint commit refused")
	// ErrPeer: the peer sent an Error frame; the wrapped sentinel says
	// which kind.
	ErrPeer = errors.New("peer reported an error")
	// ErrClosed: the stream was closed locally.
	ErrClosed = errors.New("stream closed")
)

// StreamError is the error of a failed stream: what went wrong, in which
// checkpoint epoch (0 before the first) and at which byte offset of the
// incoming stream the offending frame started (-1 when no frame is
// involved, e.g. a local write error).
type StreamError struct {
	Epoch  uint64
	Offset int64
	Err    error
}

func (e *StreamError) Error() string {
	if e.Offset < 0 {
		return fmt.Sprintf("stream epoch %d: %v", e.Epoch, e.Err)
	}
	return fmt.Sprintf("stream epoch %d, offset %d: %v", e.Epoch, e.Offset, e.Err)
}

// Unwrap returns the cause.
func (e *StreamError) Unwrap() error { return e.Err }

// errorCode is carried in Error frames so that the peer's error wraps the
// same sentinel as ours.
type errorCode uint16

const (
	codeOther errorCode = iota
	codeAuth
	codeVersion
	codeMismatch
	codeFrame
	codeTooLarge
	codeOutOfRange
	codeProtocol
	codeChecksum
	codeCommit
	codeTimeout
	codeStalled
	codeBusy
	codeRefused
)

var codeSentinels = []error{
	codeAuth:       ErrAuth,
	codeVersion:    ErrVersion,
	codeMismatch:   ErrMismatch,
	codeFrame:      ErrFrame,
	codeTooLarge:   ErrTooLarge,
	codeOutOfRange: ErrOutOfRange,
	codeProtocol:   ErrProtocol,
	codeChecksum:   ErrChecksum,
	codeCommit:     ErrCommit,
	codeTimeout:    ErrTimeout,
	codeStalled:    ErrStalled,
	codeBusy:       ErrBusy,
	codeRefused:    ErrRefused,
}

// codeOf picks the code for err, or ok=false when err is not a verdict
// about the peer's bytes worth reporting (network errors, local close).
func codeOf(err error) (errorCode, bool) {
	if errors.Is(err, ErrPeer) || errors.Is(err, ErrClosed) || errors.Is(err, ErrTruncated) {
		return 0, false
	}
	for c, s := range codeSentinels {
		if s != nil && errors.Is(err, s) {
			return errorCode(c), true
		}
	}
	return 0, false
}

// peerError turns a received Error frame into an error. The peer's text
// is shown with anything unprintable replaced, never interpreted.
func peerError(code errorCode, msg string) error {
	msg = strings.Map(func(r rune) rune {
		if !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, msg)
	if int(code) < len(codeSentinels) && codeSentinels[code] != nil {
		return fmt.Errorf("%w: %w; the peer says: %s", ErrPeer, codeSentinels[code], msg)
	}
	return fmt.Errorf("%w (code %d); the peer says: %s", ErrPeer, code, msg)
}
