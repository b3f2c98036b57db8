// Package aegis owns AEGIS-128L (RFC 10032), the authenticated cipher a
// keyed checkpoint stream seals its frames with where both hosts can run
// it: eight AES rounds per 32 bytes and nothing else, several times
// AES-256-GCM's speed on the same core (BenchmarkSeal), with a 128-bit
// key, a 128-bit nonce and a 128-bit tag.
//
// It runs only where the CPU has the AES round in hardware (amd64 with
// AES-NI and AVX: Supported). There is deliberately no software
// fallback: a table-driven AES round is slow and leaks its inputs through
// the cache, so a host without AES-NI negotiates AES-256-GCM instead.
//
// The assembly (aegis_amd64.s) does the bulk: absorbing, encrypting and
// decrypting whole 32-byte blocks with the state in registers. This file
// does what the RFC does around them: Init, the padded last blocks,
// DecPartial and Finalize.
package aegis

import (
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"unsafe"
)

// Sizes of AEGIS-128L's key, nonce and (128-bit) tag, in bytes.
const (
	KeySize   = 16
	NonceSize = 16
	TagSize   = 16
)

// blockSize is AEGIS-128L's rate: Update absorbs 256 bits.
const blockSize = 32

// ErrUnsupported is New's answer on a CPU without the AES round.
var ErrUnsupported = errors.New("aegis-128l: this CPU has no AES instructions (AES-NI and AVX)")

var errOpen = errors.New("aegis-128l: message authentication failed")

// state is S0 … S7, 16 bytes each, in the order the assembly loads them.
type state [8][16]byte

// The RFC's constants C0 and C1.
var (
	c0 = [16]byte{0x00, 0x01, 0x01, 0x02, 0x03, 0x05, 0x08, 0x0d, 0x15, 0x22, 0x37, 0x59, 0x90, 0xe9, 0x79, 0x62}
	c1 = [16]byte{0xdb, 0x3d, 0x18, 0x55, 0x6d, 0xc2, 0x2f, 0xf1, 0x20, 0x11, 0x31, 0x42, 0x73, 0xb5, 0x28, 0xdd}
)

// Supported says whether this CPU runs AEGIS-128L (New does not fail).
func Supported() bool { return supported }

// aead is AEGIS-128L under one key, as a cipher.AEAD. It holds only the
// key: every Seal and Open starts its own state, so one aead may be used
// from several goroutines at once.
type aead struct{ key [KeySize]byte }

// New returns AEGIS-128L under a 16-byte key, with 16-byte nonces and
// tags. It fails on a key of another length and on a CPU without the AES
// round (ErrUnsupported).
func New(key []byte) (cipher.AEAD, error) {
	if len(key) != KeySize {
		return nil, errors.New("aegis-128l: key must be 16 bytes")
	}
	if !supported {
		return nil, ErrUnsupported
	}
	a := new(aead)
	copy(a.key[:], key)
	return a, nil
}

func (*aead) NonceSize() int { return NonceSize }
func (*aead) Overhead() int  { return TagSize }

// Seal appends the encryption of plaintext and its tag to dst, as
// cipher.AEAD says; plaintext[:0] may be dst (in place).
func (a *aead) Seal(dst, nonce, plaintext, additionalData []byte) []byte {
	if len(nonce) != NonceSize {
		panic("aegis-128l: nonce must be 16 bytes")
	}
	ret, out := grow(dst, len(plaintext)+TagSize)
	if inexactOverlap(out, plaintext) {
		panic("aegis-128l: invalid buffer overlap")
	}
	var s state
	a.init(&s, nonce)
	absorbPadded(&s, additionalData)
	full := len(plaintext) &^ (blockSize - 1)
	if full > 0 {
		encBlocks(&s, out[:full], plaintext[:full])
	}
	if rest := plaintext[full:]; len(rest) > 0 {
		var in, ct [blockSize]byte
		copy(in[:], rest)
		encBlocks(&s, ct[:], in[:])
		copy(out[full:], ct[:len(rest)])
	}
	tag := finalize(&s, len(additionalData), len(plaintext))
	copy(out[len(plaintext):], tag[:])
	return ret
}

// Open authenticates ciphertext (with its tag) and additionalData and
// appends the plaintext to dst. On a wrong tag it returns an error and
// leaves the bytes it wrote zero; ciphertext[:0] may be dst (in place).
func (a *aead) Open(dst, nonce, ciphertext, additionalData []byte) ([]byte, error) {
	if len(nonce) != NonceSize {
		panic("aegis-128l: nonce must be 16 bytes")
	}
	if len(ciphertext) < TagSize {
		return nil, errOpen
	}
	n := len(ciphertext) - TagSize
	tag := ciphertext[n:]
	ciphertext = ciphertext[:n]
	ret, out := grow(dst, n)
	if inexactOverlap(out, ciphertext) {
		panic("aegis-128l: invalid buffer overlap")
	}
	var s state
	a.init(&s, nonce)
	absorbPadded(&s, additionalData)
	full := n &^ (blockSize - 1)
	if full > 0 {
		decBlocks(&s, out[:full], ciphertext[:full])
	}
	if cn := ciphertext[full:]; len(cn) > 0 {
		decPartial(&s, out[full:], cn)
	}
	want := finalize(&s, len(additionalData), n)
	if subtle.ConstantTimeCompare(want[:], tag) != 1 {
		clear(out)
		return nil, errOpen
	}
	return ret, nil
}

// init is the RFC's Init: the state from key and nonce, then ten
// Updates absorbing nonce || key (one block each).
func (a *aead) init(s *state, nonce []byte) {
	var kn [16]byte
	subtle.XORBytes(kn[:], a.key[:], nonce)
	s[0], s[1], s[2], s[3], s[4] = kn, c1, c0, c1, kn
	subtle.XORBytes(s[5][:], a.key[:], c0[:])
	subtle.XORBytes(s[6][:], a.key[:], c1[:])
	s[7] = s[5]
	var blocks [10 * blockSize]byte
	for i := 0; i < len(blocks); i += blockSize {
		copy(blocks[i:], nonce)
		copy(blocks[i+16:], a.key[:])
	}
	absorb(s, blocks[:])
}

// absorbPadded absorbs b, its last block padded with zeros.
func absorbPadded(s *state, b []byte) {
	full := len(b) &^ (blockSize - 1)
	if full > 0 {
		absorb(s, b[:full])
	}
	if rest := b[full:]; len(rest) > 0 {
		var pad [blockSize]byte
		copy(pad[:], rest)
		absorb(s, pad[:])
	}
}

// decPartial is the RFC's DecPartial: the last len(cn) < 32 bytes of a
// ciphertext, decrypted into out, then absorbed zero-padded.
func decPartial(s *state, out, cn []byte) {
	var z, v [blockSize]byte
	keystream(s, &z)
	copy(v[:], cn)
	subtle.XORBytes(v[:len(cn)], v[:len(cn)], z[:len(cn)])
	copy(out, v[:len(cn)])
	absorb(s, v[:]) // v holds the plaintext, then zeros
}

// keystream is z0 || z1 = S6 ^ S1 ^ (S2 & S3) || S2 ^ S5 ^ (S6 & S7).
func keystream(s *state, z *[blockSize]byte) {
	for i := range 16 {
		z[i] = s[6][i] ^ s[1][i] ^ (s[2][i] & s[3][i])
		z[16+i] = s[2][i] ^ s[5][i] ^ (s[6][i] & s[7][i])
	}
}

// finalize is the RFC's Finalize with a 128-bit tag: seven Updates of
// t || t, t = S2 ^ (LE64(ad bits) || LE64(msg bits)), then S0 ^ … ^ S6.
func finalize(s *state, adLen, msgLen int) (tag [TagSize]byte) {
	var t [16]byte
	binary.LittleEndian.PutUint64(t[0:], uint64(adLen)*8)
	binary.LittleEndian.PutUint64(t[8:], uint64(msgLen)*8)
	subtle.XORBytes(t[:], t[:], s[2][:])
	var blocks [7 * blockSize]byte
	for i := 0; i < len(blocks); i += 16 {
		copy(blocks[i:], t[:])
	}
	absorb(s, blocks[:])
	tag = s[0]
	for i := 1; i < 7; i++ {
		subtle.XORBytes(tag[:], tag[:], s[i][:])
	}
	return tag
}

// grow is the standard library's sliceForAppend: in extended by n bytes
// (reallocated if it has no room), and those n bytes.
func grow(in []byte, n int) (head, tail []byte) {
	if total := len(in) + n; cap(in) >= total {
		head = in[:total]
	} else {
		head = make([]byte, total)
		copy(head, in)
	}
	tail = head[len(in):]
	return head, tail
}

// inexactOverlap reports whether x and y share memory at different
// offsets: in place is fine, a shifted overlap is not.
func inexactOverlap(x, y []byte) bool {
	if len(x) == 0 || len(y) == 0 || &x[0] == &y[0] {
		return false
	}
	xs := uintptr(unsafe.Pointer(unsafe.SliceData(x)))
	ys := uintptr(unsafe.Pointer(unsafe.SliceData(y)))
	return xs < ys+uintptr(len(y)) && ys < xs+uintptr(len(x))
}
