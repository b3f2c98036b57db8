package witness

import "fmt"

// decodeFrame parses one whole frame whose payload is in clear (the
// handshake's, or a session frame after decryption): the fuzz target's
// entry point, over the layouts of proto.go.
func decodeFrame(b []byte) (header, any, error) {
	h, err := parseHeader(b)
	if err != nil {
		return h, nil, err
	}
	p := b[headerSize:]
	if uint32(len(p)) != h.length {
		return h, nil, fmt.Errorf("%v frame: %d payload bytes, header says %d: %w", h.typ, len(p), h.length, ErrProtocol)
	}
	switch h.typ {
	case frameHello:
		v, err := parseHello(p)
		return h, v, err
	case frameAuth:
		if len(p) != proofSize {
			return h, nil, fmt.Errorf("auth: %d bytes, want %d: %w", len(p), proofSize, ErrProtocol)
		}
		return h, p, nil
	case frameRequest:
		v, err := parseRequest(p)
		return h, v, err
	case frameReply:
		v, err := parseReply(p)
		return h, v, err
	default:
		v, err := parseErrorFrame(p)
		return h, v, err
	}
}
