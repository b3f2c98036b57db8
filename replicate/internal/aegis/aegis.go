// Package aegis owns AEGIS-128L and AEGIS-128X2 (RFC 10032), the
// authenticated ciphers a keyed checkpoint stream seals its frames with
// where both hosts can run them: eight AES rounds per 32 bytes and
// nothing else, several times AES-256-GCM's speed on the same core
// (BenchmarkSeal), with a 128-bit key, a 128-bit nonce and a 128-bit
// tag. AEGIS-128X2 is two AEGIS-128L states side by side, one per
// 128-bit lane of a 256-bit register, so that one VAES instruction
// advances both: about twice the bytes per cycle where the CPU has VAES.
//
// They run only where the CPU has the AES round in hardware (amd64 with
// AES-NI and AVX: Supported; and VAES with AVX2 for AEGIS-128X2:
// SupportedX2). There is deliberately no software fallback: a
// table-driven AES round is slow and leaks its inputs through the cache,
// so a host without AES-NI negotiates AES-256-GCM instead.
//
// The assembly (aegis_amd64.s) does the bulk: absorbing, encrypting and
// decrypting whole blocks (32 bytes, 64 for AEGIS-128X2) with the state
// in registers. This file does what the RFC does around them: Init, the
// padded last blocks, DecPartial and Finalize.
package aegis

import (
	"bytes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"strings"
	"unsafe"
)

// Sizes of AEGIS-128L's and AEGIS-128X2's key, nonce and (128-bit) tag,
// in bytes.
const (
	KeySize   = 16
	NonceSize = 16
	TagSize   = 16
)

// ErrUnsupported is New's answer on a CPU without the AES round, or
// whose AES round fails the known-answer test.
var ErrUnsupported = errors.New("aegis-128l: this CPU has no AES instructions (AES-NI and AVX), or they fail a known-answer test")

// ErrUnsupportedX2 is NewX2's answer on a CPU without the AES round on
// 256-bit vectors, or whose VAES fails the known-answer test.
var ErrUnsupportedX2 = errors.New("aegis-128x2: this CPU has no AES instructions on 256-bit vectors (VAES and AVX2), or they fail a known-answer test")

// state is S0 … S7 of AEGIS-128L, or of AEGIS-128X2's two lanes: block
// j of lane i is at (j*lanes+i)*16, as the assembly loads it (X or Y
// registers). AEGIS-128L uses the first 128 bytes.
type state [8 * 2 * 16]byte

// The RFC's constants C0 and C1.
var (
	c0 = [16]byte{0x00, 0x01, 0x01, 0x02, 0x03, 0x05, 0x08, 0x0d, 0x15, 0x22, 0x37, 0x59, 0x90, 0xe9, 0x79, 0x62}
	c1 = [16]byte{0xdb, 0x3d, 0x18, 0x55, 0x6d, 0xc2, 0x2f, 0xf1, 0x20, 0x11, 0x31, 0x42, 0x73, 0xb5, 0x28, 0xdd}
)

// Supported says whether this CPU runs AEGIS-128L (New does not fail).
func Supported() bool { return supported }

// SupportedX2 says whether this CPU runs AEGIS-128X2 (NewX2 does not
// fail): it has VAES, the AES round on each 128-bit lane of a 256-bit
// register, where one instruction advances both lanes.
func SupportedX2() bool { return supportedX2 }

// variant is what differs between AEGIS-128L and AEGIS-128X2 (RFC
// 10032 section 5: D parallel AEGIS-128L states, told apart by a
// context mixed in during Init, whose tags are XORed together).
type variant struct {
	name  string
	lanes int // D: 1 for AEGIS-128L, 2 for AEGIS-128X2
	// The assembly: Update on each block of b; Enc and Dec on each
	// block of src into dst (whole blocks of 32*lanes bytes).
	absorb   func(s *state, b []byte)
	enc, dec func(s *state, dst, src []byte)
}

var (
	v128L  = &variant{name: "aegis-128l", lanes: 1, absorb: absorb, enc: encBlocks, dec: decBlocks}
	v128X2 = &variant{name: "aegis-128x2", lanes: 2, absorb: absorbX2, enc: encBlocksX2, dec: decBlocksX2}
)

// blockSize is the variant's rate: Update absorbs 256 bits per lane.
func (v *variant) blockSize() int { return 32 * v.lanes }

// block is block j of lane i of s.
func (v *variant) block(s *state, j, i int) []byte {
	o := (j*v.lanes + i) * 16
	return s[o : o+16]
}

// aead is AEGIS-128L or AEGIS-128X2 under one key, as a cipher.AEAD. It
// holds only the key: every Seal and Open starts its own state, so one
// aead may be used from several goroutines at once.
type aead struct {
	v   *variant
	key [KeySize]byte
}

// New returns AEGIS-128L under a 16-byte key, with 16-byte nonces and
// tags. It fails on a key of another length and on a CPU without the AES
// round (ErrUnsupported).
func New(key []byte) (cipher.AEAD, error) {
	if !supported {
		return nil, ErrUnsupported
	}
	return newAEAD(v128L, key)
}

// NewX2 returns AEGIS-128X2 under a 16-byte key, with 16-byte nonces and
// tags: two AEGIS-128L states advanced side by side in 256-bit
// registers, 64 bytes per Update. It fails on a key of another length
// and on a CPU without VAES (ErrUnsupportedX2).
func NewX2(key []byte) (cipher.AEAD, error) {
	if !supportedX2 {
		return nil, ErrUnsupportedX2
	}
	return newAEAD(v128X2, key)
}

func newAEAD(v *variant, key []byte) (cipher.AEAD, error) {
	if len(key) != KeySize {
		return nil, errors.New(v.name + ": key must be 16 bytes")
	}
	a := &aead{v: v}
	copy(a.key[:], key)
	return a, nil
}

func (*aead) NonceSize() int { return NonceSize }
func (*aead) Overhead() int  { return TagSize }

// Seal appends the encryption of plaintext and its tag to dst, as
// cipher.AEAD says; plaintext[:0] may be dst (in place).
func (a *aead) Seal(dst, nonce, plaintext, additionalData []byte) []byte {
	v := a.v
	if len(nonce) != NonceSize {
		panic(v.name + ": nonce must be 16 bytes")
	}
	ret, out := grow(dst, len(plaintext)+TagSize)
	if inexactOverlap(out, plaintext) {
		panic(v.name + ": invalid buffer overlap")
	}
	var s state
	a.init(&s, nonce)
	v.absorbPadded(&s, additionalData)
	full := len(plaintext) &^ (v.blockSize() - 1)
	if full > 0 {
		v.enc(&s, out[:full], plaintext[:full])
	}
	if rest := plaintext[full:]; len(rest) > 0 {
		var in, ct [64]byte
		copy(in[:], rest)
		v.enc(&s, ct[:v.blockSize()], in[:v.blockSize()])
		copy(out[full:], ct[:len(rest)])
	}
	tag := v.finalize(&s, len(additionalData), len(plaintext))
	copy(out[len(plaintext):], tag[:])
	return ret
}

// Open authenticates ciphertext (with its tag) and additionalData and
// appends the plaintext to dst. On a wrong tag it returns an error and
// leaves the bytes it wrote zero; ciphertext[:0] may be dst (in place).
func (a *aead) Open(dst, nonce, ciphertext, additionalData []byte) ([]byte, error) {
	v := a.v
	if len(nonce) != NonceSize {
		panic(v.name + ": nonce must be 16 bytes")
	}
	if len(ciphertext) < TagSize {
		return nil, errOpen
	}
	n := len(ciphertext) - TagSize
	tag := ciphertext[n:]
	ciphertext = ciphertext[:n]
	ret, out := grow(dst, n)
	if inexactOverlap(out, ciphertext) {
		panic(v.name + ": invalid buffer overlap")
	}
	var s state
	a.init(&s, nonce)
	v.absorbPadded(&s, additionalData)
	full := n &^ (v.blockSize() - 1)
	if full > 0 {
		v.dec(&s, out[:full], ciphertext[:full])
	}
	if cn := ciphertext[full:]; len(cn) > 0 {
		v.decPartial(&s, out[full:], cn)
	}
	want := v.finalize(&s, len(additionalData), n)
	if subtle.ConstantTimeCompare(want[:], tag) != 1 {
		clear(out)
		return nil, errOpen
	}
	return ret, nil
}

var errOpen = errors.New("aegis: message authentication failed")

// init is the RFC's Init: each lane's state from key and nonce, then
// ten Updates absorbing nonce || key in every lane, each after XORing
// the lane's context (its index and the highest index, a byte each)
// into S3 and S7. AEGIS-128L's one lane has a context of zero.
func (a *aead) init(s *state, nonce []byte) {
	v := a.v
	var kn, kc0, kc1 [16]byte
	subtle.XORBytes(kn[:], a.key[:], nonce)
	subtle.XORBytes(kc0[:], a.key[:], c0[:])
	subtle.XORBytes(kc1[:], a.key[:], c1[:])
	for i := range v.lanes {
		for j, b := range [8]*[16]byte{&kn, &c1, &c0, &c1, &kn, &kc0, &kc1, &kc0} {
			copy(v.block(s, j, i), b[:])
		}
	}
	var blocks [10 * 64]byte
	bs := v.blockSize()
	for i := 0; i < 10*bs; i += 16 {
		if i/16%(2*v.lanes) < v.lanes {
			copy(blocks[i:], nonce)
		} else {
			copy(blocks[i:], a.key[:])
		}
	}
	if v.lanes == 1 {
		v.absorb(s, blocks[:10*bs])
		return
	}
	for r := range 10 {
		for i := range v.lanes {
			for _, j := range []int{3, 7} {
				b := v.block(s, j, i)
				b[0] ^= byte(i)
				b[1] ^= byte(v.lanes - 1)
			}
		}
		v.absorb(s, blocks[r*bs:(r+1)*bs])
	}
}

// absorbPadded absorbs b, its last block padded with zeros.
func (v *variant) absorbPadded(s *state, b []byte) {
	full := len(b) &^ (v.blockSize() - 1)
	if full > 0 {
		v.absorb(s, b[:full])
	}
	if rest := b[full:]; len(rest) > 0 {
		var pad [64]byte
		copy(pad[:], rest)
		v.absorb(s, pad[:v.blockSize()])
	}
}

// decPartial is the RFC's DecPartial: the last len(cn) < blockSize bytes
// of a ciphertext, decrypted into out, then absorbed zero-padded.
func (v *variant) decPartial(s *state, out, cn []byte) {
	var z, p [64]byte
	v.keystream(s, &z)
	copy(p[:], cn)
	subtle.XORBytes(p[:len(cn)], p[:len(cn)], z[:len(cn)])
	copy(out, p[:len(cn)])
	v.absorb(s, p[:v.blockSize()]) // p holds the plaintext, then zeros
}

// keystream is z0 || z1, lane by lane within each: z0 = S6 ^ S1 ^
// (S2 & S3), z1 = S2 ^ S5 ^ (S6 & S7).
func (v *variant) keystream(s *state, z *[64]byte) {
	for i := range v.lanes {
		s1, s2, s3 := v.block(s, 1, i), v.block(s, 2, i), v.block(s, 3, i)
		s5, s6, s7 := v.block(s, 5, i), v.block(s, 6, i), v.block(s, 7, i)
		z0, z1 := z[16*i:], z[16*(v.lanes+i):]
		for k := range 16 {
			z0[k] = s6[k] ^ s1[k] ^ (s2[k] & s3[k])
			z1[k] = s2[k] ^ s5[k] ^ (s6[k] & s7[k])
		}
	}
}

// finalize is the RFC's Finalize with a 128-bit tag: seven Updates of
// t || t, t lane i = S2 of lane i ^ (LE64(ad bits) || LE64(msg bits)),
// then S0 ^ … ^ S6 of every lane, XORed together.
func (v *variant) finalize(s *state, adLen, msgLen int) (tag [TagSize]byte) {
	var u [16]byte
	binary.LittleEndian.PutUint64(u[0:], uint64(adLen)*8)
	binary.LittleEndian.PutUint64(u[8:], uint64(msgLen)*8)
	var t [32]byte // t: a block per lane
	for i := range v.lanes {
		subtle.XORBytes(t[16*i:16*(i+1)], u[:], v.block(s, 2, i))
	}
	tl := 16 * v.lanes
	var blocks [7 * 64]byte
	for i := 0; i < 7*v.blockSize(); i += tl {
		copy(blocks[i:], t[:tl])
	}
	v.absorb(s, blocks[:7*v.blockSize()])
	for i := range v.lanes {
		for j := range 7 {
			subtle.XORBytes(tag[:], tag[:], v.block(s, j, i))
		}
	}
	return tag
}

// knownAnswer runs one of RFC 10032's test vectors through v's assembly,
// sealing and opening: whether the CPU computes what the RFC says. A CPU
// may claim an instruction and get it wrong: QEMU 7.2's emulated VAES
// (the lab's L1, Debian 12) computes the upper lane of a 256-bit
// VAESENC as a copy of the lower one, so AEGIS-128X2 there would seal
// with a cipher of its own, which no other host opens. Such a CPU is
// treated as one without the instruction. Run once, at start-up, where
// the CPU claims the instructions; a few microseconds.
func knownAnswer(v *variant) bool {
	type vector struct{ key, nonce, ad, msg, ct, tag string }
	tv := vector{ // AEGIS-128L's test vector 5: blocks of ad and msg, each with a partial last one
		"10010000000000000000000000000000", "10000200000000000000000000000000",
		"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829",
		"101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637",
		"b31052ad1cca4e291abcf2df3502e6bdb1bfd6db36798be3607b1f94d34478aa7ede7f7a990fec10",
		"7542a745733014f9474417b337399507",
	}
	if v.lanes == 2 { // AEGIS-128X2's test vector 2: a partial ad block, one whole msg block and a partial one
		tv = vector{
			"000102030405060708090a0b0c0d0e0f", "101112131415161718191a1b1c1d1e1f", "0102030401020304",
			strings.Repeat("04050607", 30),
			"5795544301997f93621b278809d6331b3bfa6f18e90db12c4aa35965b5e98c5f",
			"1aebc200804f405cab637f2adebb6d77",
		}
	}
	unhex := func(h string) []byte {
		b, err := hex.DecodeString(h)
		if err != nil {
			panic(err) // a typo above
		}
		return b
	}
	a, _ := newAEAD(v, unhex(tv.key))
	nonce, ad, msg, ct, tag := unhex(tv.nonce), unhex(tv.ad), unhex(tv.msg), unhex(tv.ct), unhex(tv.tag)
	sealed := a.Seal(nil, nonce, msg, ad)
	if !bytes.HasPrefix(sealed, ct) || !bytes.Equal(sealed[len(msg):], tag) {
		return false
	}
	opened, err := a.Open(nil, nonce, sealed, ad)
	return err == nil && bytes.Equal(opened, msg)
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
