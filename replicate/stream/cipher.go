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
	// CipherAuto seals with AEGIS-128L when both ends' CPUs run it and
	// neither end asks for AES-256-GCM, else with AES-256-GCM.
	CipherAuto Cipher = iota
	// CipherAESGCM always seals with AES-256-GCM (for a site that allows
	// only NIST-approved modes). The peer follows.
	CipherAESGCM
	// CipherAEGIS seals with AEGIS-128L (RFC 10032) and refuses a peer
	// that will not or cannot, and a CPU without AES-NI and AVX.
	CipherAEGIS
)

// sessionCipher is what a session's two hellos agreed on.
type sessionCipher uint8

const (
	sealAESGCM sessionCipher = iota // AES-256-GCM, 12-byte nonces
	sealAEGIS                       // AEGIS-128L, 16-byte nonces
)

func (c sessionCipher) String() string {
	if c == sealAEGIS {
		return "aegis-128l"
	}
	return "aes-256-gcm"
}

// helloFlagAEGIS, in a keyed hello, says this end seals and opens with
// AEGIS-128L and prefers it: with it in both hellos the session does.
// Both hellos are in the transcript, so a man in the middle cannot strip
// it without the proofs failing.
const helloFlagAEGIS = 1 << 4

// ParseCipher parses a --stream-cipher value: auto, aegis-128l or
// aes-256-gcm.
func ParseCipher(s string) (Cipher, error) {
	switch s {
	case "auto":
		return CipherAuto, nil
	case "aegis-128l":
		return CipherAEGIS, nil
	case "aes-256-gcm":
		return CipherAESGCM, nil
	}
	return CipherAuto, fmt.Errorf("%w: stream cipher %q: want auto, aegis-128l or aes-256-gcm", ErrConfig, s)
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
	}
	return fmt.Sprintf("cipher %d", uint8(c))
}

// Check says whether this host can seal with c: only CipherAEGIS can be
// refused (a CPU without AES-NI and AVX).
func (c Cipher) Check() error {
	if c == CipherAEGIS && !aegis.Supported() {
		return aegis.ErrUnsupported
	}
	return nil
}

// offersAEGIS says whether this end's hello carries helloFlagAEGIS.
func (c Cipher) offersAEGIS() bool { return c != CipherAESGCM && aegis.Supported() }

// newAEAD returns the session cipher under a direction's 32-byte
// session key: AES-256-GCM under all of it, AEGIS-128L under its first
// 16 bytes (the key derived for AEGIS has a purpose of its own,
// sessionPurpose, so no key is ever used by both ciphers).
func newAEAD(c sessionCipher, key []byte) cipher.AEAD {
	if len(key) != 32 {
		panic(fmt.Sprintf("stream: session key of %d bytes", len(key)))
	}
	if c == sealAEGIS {
		a, err := aegis.New(key[:aegis.KeySize])
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

// NewAEAD is c (CipherAEGIS or CipherAESGCM) under a 32-byte key, as a
// keyed session seals with it: for measuring the sealing alone (govmm
// bench ack's sealed bound). Nonces are c's size (12 or 16 bytes), tags
// 16 bytes.
func NewAEAD(c Cipher, key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("%w: a session key has 32 bytes, not %d", ErrConfig, len(key))
	}
	switch c {
	case CipherAEGIS:
		if err := c.Check(); err != nil {
			return nil, err
		}
		return newAEAD(sealAEGIS, key), nil
	case CipherAESGCM:
		return newAEAD(sealAESGCM, key), nil
	}
	return nil, fmt.Errorf("%w: %v is no session cipher", ErrConfig, c)
}

// sessionPurpose is the key derivation's purpose for a direction's key
// under c: AES-256-GCM keeps the purposes of earlier versions.
func sessionPurpose(c sessionCipher, purpose string) string {
	if c == sealAEGIS {
		return purpose + " aegis-128l"
	}
	return purpose
}
