package stream

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"time"
)

// What the tests inspect of a stream's ends, and the constructor and
// decoder they drive directly; production code reaches these through
// Listener, the sinks and the Standby.

// LastHeard is when the last byte from the peer arrived (or listening
// resumed).
func (e *endpoint) LastHeard() time.Time { return time.Unix(0, e.lastHeard.Load()) }

// NewReceiver runs the handshake on conn as the receiving end, then
// cfg.Verify, and accepts the sender (or refuses it, telling it why). It
// takes ownership of conn and closes it on failure.
func NewReceiver(ctx context.Context, conn net.Conn, cfg Config) (*Receiver, error) {
	r, err := handshakeReceiver(ctx, conn, cfg)
	if err != nil {
		return nil, err
	}
	if err := r.verdict(r.cfg.Verify); err != nil {
		return nil, err
	}
	return r, nil
}

// Committed is the last committed epoch (0 if none).
func (r *Receiver) Committed() uint64 { return r.committed.Load() }

// LastResumable is the last committed epoch that the guest can resume
// from (KindEpoch or KindFinal), 0 if none: where failover resumes.
func (r *Receiver) LastResumable() uint64 { return r.resumable.Load() }

// Page returns a copy of the committed page at gpa, or nil if none was
// ever committed.
func (s *MemSink) Page(gpa GPA) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.committed[gpa])
}

// Len is the number of distinct committed pages.
func (s *MemSink) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.committed)
}

// Staged is the number of pages staged and not yet committed.
func (s *MemSink) Staged() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.staged)
}

// waitApplied waits until the last checkpoint committed into s is in
// s.Dest: a Receiver acknowledges before that (asyncCommitter).
func (s *StagingSink) waitApplied() {
	s.mu.Lock()
	ch := s.done
	s.mu.Unlock()
	if ch != nil {
		<-ch
	}
}

// DecodeFrame decodes one frame in the clear (header and plaintext
// payload; a MAC or tag trailer, if present, is ignored and not verified)
// from b, checking page addresses against layout: the decoder the stream
// uses after authenticating and decrypting a frame, for the fuzz target.
// It returns the frame's type name and the number of bytes consumed
// (header + payload).
func DecodeFrame(b []byte, layout Identity) (string, int, error) {
	var f frame
	if t := frameType(b[4%len(b)]); len(b) > headerSize && (t == framePages || t == frameDisk || t == frameState) {
		// As a session that agreed on the frame's codec, and on deltas.
		f.zc = newPageCodec(codec(b[headerSize]))
		f.deltas = true
	}
	n, err := decodeFrame(&f, b, &layout)
	return f.typ.String(), n, err
}

// decodeFrame decodes one whole frame in the clear, as the stream does
// after authenticating and decrypting it.
func decodeFrame(f *frame, b []byte, layout *Identity) (int, error) {
	if len(b) < headerSize {
		return 0, fmt.Errorf("frame header truncated: %w", ErrTruncated)
	}
	h, err := parseHeader(b)
	if err != nil {
		return 0, err
	}
	if err := checkHeader(h, false); err != nil {
		return 0, err
	}
	end := headerSize + int(h.length)
	if len(b) < end {
		return 0, fmt.Errorf("%v frame truncated: %w", h.typ, ErrTruncated)
	}
	f.seq = h.seq
	if err := decodePayload(f, h.typ, b[headerSize:end], layout); err != nil {
		return 0, err
	}
	return end, nil
}
