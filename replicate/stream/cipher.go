package stream

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"

	"govmm/replicate/internal/aegis"
)

// Cipher is the AEAD a keyed session seals its frames with (Config.Cipher,
// --stream-cipher). An unkeyed session seals nothing: its frames carry a
// CRC32C.
type Cipher uint8

const (
	// CipherAuto seals with the fastest cipher both ends' CPUs run,
	// unless either end asks for one: AEGIS-128X2 where both have VAES,
	// else AEGIS-128L where both have AES-NI and AVX, else AES-256-GCM.
	CipherAuto Cipher = iota
	// CipherAESGCM always seals with AES-256-GCM (for a site that allows
	// only NIST-approved modes). The peer follows.
	CipherAESGCM
	// CipherAEGIS seals with AEGIS-128L (RFC 10032) and refuses a peer
	// that will not or cannot, and a CPU without AES-NI and AVX.
	CipherAEGIS
	// CipherAEGISX2 seals with AEGIS-128X2 (RFC 10032 section 5: two
	// AEGIS-128L states in the lanes of 256-bit registers) and refuses a
	// peer that will not or cannot, and a CPU without VAES.
	CipherAEGISX2
)

// sessionCipher is what a session's two hellos agreed on.
type sessionCipher uint8

const (
	sealAESGCM  sessionCipher = iota // AES-256-GCM, 12-byte nonces
	sealAEGIS                        // AEGIS-128L, 16-byte nonces
	sealAEGISX2                      // AEGIS-128X2, 16-byte nonces
)

func (c sessionCipher) String() string {
	switch c {
	case sealAEGIS:
		return "aegis-128l"
	case sealAEGISX2:
		return "aegis-128x2"
	}
	return "aes-256-gcm"
}

// helloFlagAEGIS and helloFlagAEGISX2, in a keyed hello, say this end
// seals and opens with AEGIS-128L, or AEGIS-128X2, and prefers it: the
// session takes the first of AEGIS-128X2, AEGIS-128L that both hellos
// carry. Both hellos are in the transcript, so a man in the middle
// cannot strip a flag without the proofs failing.
const (
	helloFlagAEGIS   = 1 << 4
	helloFlagAEGISX2 = 1 << 5 // version 17
)

// ParseCipher parses a --stream-cipher value: auto, aegis-128x2,
// aegis-128l or aes-256-gcm.
func ParseCipher(s string) (Cipher, error) {
	for _, c := range []Cipher{CipherAuto, CipherAEGISX2, CipherAEGIS, CipherAESGCM} {
		if s == c.String() {
			return c, nil
		}
	}
	return CipherAuto, fmt.Errorf("%w: stream cipher %q: want auto, aegis-128x2, aegis-128l or aes-256-gcm", ErrConfig, s)
}

// String is the --stream-cipher value for c.
func (c Cipher) String() string {
	switch c {
	case CipherAuto:
		return "auto"
	case CipherAESGCM:
		return "aes-256-gcm"
	case CipherAEGIS:
		return "aegis-128l"
	case CipherAEGISX2:
		return "aegis-128x2"
	}
	return fmt.Sprintf("cipher %d", uint8(c))
}

// Check says whether this host can seal with c: CipherAEGIS is refused
// on a CPU without AES-NI and AVX, CipherAEGISX2 on one without VAES.
func (c Cipher) Check() error {
	switch {
	case c == CipherAEGIS && !aegis.Supported():
		return aegis.ErrUnsupported
	case c == CipherAEGISX2 && !aegis.SupportedX2():
		return aegis.ErrUnsupportedX2
	}
	return nil
}

// offersAEGIS and offersAEGISX2 say whether this end's hello carries
// helloFlagAEGIS and helloFlagAEGISX2: what it runs, of what it accepts.
func (c Cipher) offersAEGIS() bool {
	return (c == CipherAuto || c == CipherAEGIS) && aegis.Supported()
}

func (c Cipher) offersAEGISX2() bool {
	return (c == CipherAuto || c == CipherAEGISX2) && aegis.SupportedX2()
}

// session is the sessionCipher c asks for, when it asks for one.
func (c Cipher) session() (sessionCipher, bool) {
	switch c {
	case CipherAEGIS:
		return sealAEGIS, true
	case CipherAEGISX2:
		return sealAEGISX2, true
	}
	return 0, false
}

// newAEAD returns the session cipher under a direction's 32-byte
// session key: AES-256-GCM under all of it, AEGIS-128L or AEGIS-128X2
// under its first 16 bytes (the key derived for each AEGIS has a purpose
// of its own, sessionPurpose, so no key is ever used by two ciphers).
func newAEAD(c sessionCipher, key []byte) cipher.AEAD {
	if len(key) != 32 {
		panic(fmt.Sprintf("stream: session key of %d bytes", len(key)))
	}
	if c == sealAEGIS || c == sealAEGISX2 {
		newAEGIS := aegis.New
		if c == sealAEGISX2 {
			newAEGIS = aegis.NewX2
		}
		a, err := newAEGIS(key[:aegis.KeySize])
		if err != nil {
			panic(err) // the hello offered it only where it runs
		}
		return a
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // a 32-byte key is always valid
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		panic(err) // the standard nonce and tag sizes are always valid
	}
	return a
}

// NewAEAD is c (CipherAEGISX2, CipherAEGIS or CipherAESGCM) under a
// 32-byte key, as a keyed session seals with it: for measuring the
// sealing alone (govmm bench ack's sealed bound). Nonces are c's size
// (12 or 16 bytes), tags 16 bytes.
func NewAEAD(c Cipher, key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("%w: a session key has 32 bytes, not %d", ErrConfig, len(key))
	}
	if c == CipherAESGCM {
		return newAEAD(sealAESGCM, key), nil
	}
	sc, ok := c.session()
	if !ok {
		return nil, fmt.Errorf("%w: %v is no session cipher", ErrConfig, c)
	}
	if err := c.Check(); err != nil {
		return nil, err
	}
	return newAEAD(sc, key), nil
}

// sessionPurpose is the key derivation's purpose for a direction's key
// under c: AES-256-GCM keeps the purposes of earlier versions.
func sessionPurpose(c sessionCipher, purpose string) string {
	if c == sealAESGCM {
		return purpose
	}
	return purpose + " " + c.String()
}
