package witness

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"govmm/replicate/internal/kdf"
)

const label = "govmm-witness/1 "

// transcript hashes both hellos (kdf.Transcript), so that the proofs and
// session keys bind every field of them (version, roles, both nonces).
func transcript(clientHello, witnessHello []byte) []byte {
	return kdf.Transcript(label, clientHello, witnessHello)
}

// derive is kdf.Derive under this protocol's label.
func derive(key []byte, purpose string, th []byte) []byte { return kdf.Derive(key, label, purpose, th) }

// conn frames one witness connection. Before the handshake completes,
// frames travel in clear (hellos, proofs, a refusal); afterwards every
// frame is sealed with AES-256-GCM under its direction's session key, the
// 16-byte header as additional data and its sequence number as the nonce.
// A conn is used by one goroutine at a time.
type conn struct {
	nc     net.Conn
	r      *bufio.Reader
	rseq   uint64 // next sequence number expected
	wseq   uint64 // next sequence number to send
	ropen  cipher.AEAD
	wseal  cipher.AEAD
	hdr    [headerSize]byte // the frame being written's header
	wbuf   []byte
	rbuf   []byte
	nonce  [12]byte
	closed bool
}

func newConn(nc net.Conn) *conn {
	return &conn{nc: nc, r: bufio.NewReaderSize(nc, headerSize+MaxPayload+tagSize)}
}

func newAEAD(key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic("witness: aes key: " + err.Error()) // key is always 32 bytes
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic("witness: gcm: " + err.Error())
	}
	return g
}

func (c *conn) nonceFor(seq uint64) []byte {
	binary.LittleEndian.PutUint64(c.nonce[4:], seq)
	return c.nonce[:]
}

// write sends one frame (sealed once the session keys are set).
func (c *conn) write(t frameType, payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("%v frame: payload %d bytes, at most %d", t, len(payload), MaxPayload)
	}
	putHeader(c.hdr[:], header{length: uint32(len(payload)), typ: t, seq: c.wseq})
	b := append(c.wbuf[:0], c.hdr[:]...)
	if c.wseal != nil {
		// The header is the additional data; it is passed from its own
		// array, since dst and additionalData may not overlap.
		b = c.wseal.Seal(b, c.nonceFor(c.wseq), payload, c.hdr[:])
	} else {
		b = append(b, payload...)
	}
	c.wbuf = b
	c.wseq++
	_, err := c.nc.Write(b)
	return err
}

// read returns the next frame's type and plaintext payload (valid until
// the next read). A frame out of sequence or whose tag does not verify is
// ErrAuth; a connection closed inside a frame is a truncated frame.
func (c *conn) read() (frameType, []byte, error) {
	var hb [headerSize]byte
	if _, err := io.ReadFull(c.r, hb[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return 0, nil, fmt.Errorf("truncated frame header: %w", io.ErrUnexpectedEOF)
		}
		return 0, nil, err
	}
	h, err := parseHeader(hb[:])
	if err != nil {
		return 0, nil, err
	}
	n := int(h.length)
	if c.ropen != nil {
		n += tagSize
	}
	if cap(c.rbuf) < n {
		c.rbuf = make([]byte, n, headerSize+MaxPayload+tagSize)
	}
	body := c.rbuf[:n]
	if got, err := io.ReadFull(c.r, body); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return 0, nil, fmt.Errorf("truncated %v frame (%d of %d bytes): %w", h.typ, got, n, io.ErrUnexpectedEOF)
		}
		return 0, nil, err
	}
	if h.seq != c.rseq {
		return 0, nil, fmt.Errorf("%v frame has sequence number %d, want %d (replayed, reordered or dropped): %w", h.typ, h.seq, c.rseq, ErrAuth)
	}
	c.rseq++
	if c.ropen == nil {
		return h.typ, body, nil
	}
	p, err := c.ropen.Open(body[:0], c.nonceFor(h.seq), body, hb[:])
	if err != nil {
		return 0, nil, fmt.Errorf("%v frame %d does not authenticate (forged or corrupted): %w", h.typ, h.seq, ErrAuth)
	}
	return h.typ, p, nil
}

// refusal reads an error frame's text into an error.
func peerRefusal(p []byte) error {
	msg, err := parseErrorFrame(p)
	if err != nil {
		return err
	}
	return fmt.Errorf("peer refused: %s", msg)
}

func (c *conn) close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	return c.nc.Close()
}

// clientHandshake proves knowledge of key to the witness and checks the
// witness's proof; the caller sets the deadline.
//
//	client                                  witness
//	Hello{v1, client, nonceC}   ------------>
//	              <------------  Hello{v1, witness, nonceW}
//	Auth{HMAC(K, "proof client" || th)} ---> verify, else Error (clear) + close
//	              <------------  Auth{HMAC(K, "proof witness" || th)}
//	... every later frame sealed with HMAC(K, "key client-to-witness" || th)
//	    or HMAC(K, "key witness-to-client" || th) ...
func (c *conn) clientHandshake(key []byte) error {
	own := hello{version: Version, role: roleClient}
	_, _ = rand.Read(own.nonce[:])
	ownBytes := appendHello(nil, &own)
	if err := c.write(frameHello, ownBytes); err != nil {
		return err
	}
	peerBytes, err := c.readHello(roleWitness)
	if err != nil {
		return err
	}
	th := transcript(ownBytes, peerBytes)
	if err := c.write(frameAuth, derive(key, "proof client", th)); err != nil {
		return err
	}
	if err := c.readProof(key, "proof witness", th); err != nil {
		return err
	}
	c.wseal = newAEAD(derive(key, "key client-to-witness", th))
	c.ropen = newAEAD(derive(key, "key witness-to-client", th))
	return nil
}

// witnessHandshake is the witness's side. On failure the caller tells
// the client why (handshakeRefusal) and hangs up.
func (c *conn) witnessHandshake(key []byte) error {
	peerBytes, err := c.readHello(roleClient)
	if err != nil {
		return err
	}
	own := hello{version: Version, role: roleWitness}
	_, _ = rand.Read(own.nonce[:])
	ownBytes := appendHello(nil, &own)
	if err := c.write(frameHello, ownBytes); err != nil {
		return err
	}
	th := transcript(peerBytes, ownBytes)
	if err := c.readProof(key, "proof client", th); err != nil {
		return err
	}
	if err := c.write(frameAuth, derive(key, "proof witness", th)); err != nil {
		return err
	}
	c.ropen = newAEAD(derive(key, "key client-to-witness", th))
	c.wseal = newAEAD(derive(key, "key witness-to-client", th))
	return nil
}

// handshakeRefusal is what the witness tells a client whose handshake
// failed, in clear ("" for nothing: the client is not speaking the
// protocol, or is gone).
func handshakeRefusal(err error) string {
	switch {
	case errors.Is(err, ErrAuth):
		return "authentication failed (wrong key?)"
	case errors.Is(err, ErrVersion):
		return fmt.Sprintf("witness speaks protocol version %d", Version)
	}
	return ""
}

func (c *conn) readHello(want role) ([]byte, error) {
	t, p, err := c.read()
	if err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	switch t {
	case frameError:
		return nil, fmt.Errorf("hello: %w: %w", peerRefusal(p), ErrVersion)
	case frameHello:
	default:
		return nil, fmt.Errorf("got %v frame, want hello: %w", t, ErrProtocol)
	}
	h, err := parseHello(p)
	if err != nil {
		return nil, err
	}
	if h.role != want {
		return nil, fmt.Errorf("hello: peer has role %d, want %d: %w", h.role, want, ErrProtocol)
	}
	return append([]byte(nil), p...), nil
}

func (c *conn) readProof(key []byte, purpose string, th []byte) error {
	t, p, err := c.read()
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	switch t {
	case frameError:
		return fmt.Errorf("auth: %w: %w", peerRefusal(p), ErrAuth)
	case frameAuth:
	default:
		return fmt.Errorf("got %v frame, want auth: %w", t, ErrProtocol)
	}
	if len(p) != proofSize || !hmac.Equal(p, derive(key, purpose, th)) {
		return fmt.Errorf("peer's proof does not verify (wrong key, or not a govmm witness peer): %w", ErrAuth)
	}
	return nil
}
