package aegis

import (
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"testing"
)

// A plain Go model of AEGIS-128L, written from RFC 10032's pseudocode
// line by line, to check the assembly against at every length. Its AES
// round is the textbook one (FIPS-197 section 5.1), with the S-box
// computed from its definition (inverse in GF(2^8), then the affine
// map) rather than typed in. Slow and not constant-time: tests only.

var sbox = func() (s [256]byte) {
	mul := func(a, b byte) (p byte) {
		for b != 0 {
			if b&1 != 0 {
				p ^= a
			}
			hi := a & 0x80
			a <<= 1
			if hi != 0 {
				a ^= 0x1b
			}
			b >>= 1
		}
		return p
	}
	for x := range 256 {
		var inv byte
		for y := 1; y < 256 && x != 0; y++ {
			if mul(byte(x), byte(y)) == 1 {
				inv = byte(y)
				break
			}
		}
		r := inv
		for i := 1; i <= 4; i++ {
			r ^= inv<<i | inv>>(8-i)
		}
		s[x] = r ^ 0x63
	}
	return s
}()

func xtime(b byte) byte {
	if b&0x80 != 0 {
		return b<<1 ^ 0x1b
	}
	return b << 1
}

// refAESRound is SubBytes, ShiftRows, MixColumns, then rk XORed in. The
// 16 bytes are the AES state column by column (byte 4c+r is row r of
// column c).
func refAESRound(in, rk [16]byte) (out [16]byte) {
	var t [16]byte
	for c := range 4 {
		for r := range 4 {
			t[4*c+r] = sbox[in[4*((c+r)%4)+r]]
		}
	}
	for c := range 4 {
		a := t[4*c : 4*c+4]
		all := a[0] ^ a[1] ^ a[2] ^ a[3]
		for r := range 4 {
			out[4*c+r] = a[r] ^ all ^ xtime(a[r]^a[(r+1)%4])
		}
	}
	for i := range out {
		out[i] ^= rk[i]
	}
	return out
}

func TestRefAESRound(t *testing.T) {
	var in, rk [16]byte
	for i := range 16 {
		in[i], rk[i] = byte(i), byte(0x10+i)
	}
	out := refAESRound(in, rk)
	if got := hex.EncodeToString(out[:]); got != "7a7b4e5638782546a8c0477a3b813f43" {
		t.Fatalf("AESRound test vector: got %s", got)
	}
}

func xor16(a, b [16]byte) (o [16]byte) {
	subtle.XORBytes(o[:], a[:], b[:])
	return o
}

func and16(a, b [16]byte) (o [16]byte) {
	for i := range o {
		o[i] = a[i] & b[i]
	}
	return o
}

func refUpdate(s *state, m0, m1 [16]byte) {
	var n state
	n[0] = refAESRound(s[7], xor16(s[0], m0))
	n[1] = refAESRound(s[0], s[1])
	n[2] = refAESRound(s[1], s[2])
	n[3] = refAESRound(s[2], s[3])
	n[4] = refAESRound(s[3], xor16(s[4], m1))
	n[5] = refAESRound(s[4], s[5])
	n[6] = refAESRound(s[5], s[6])
	n[7] = refAESRound(s[6], s[7])
	*s = n
}

func halves(b []byte) (x, y [16]byte) {
	copy(x[:], b[:16])
	copy(y[:], b[16:32])
	return x, y
}

func pad32(b []byte) []byte {
	p := make([]byte, (len(b)+31)/32*32)
	copy(p, b)
	return p
}

// refSeal is the RFC's Encrypt with a 128-bit tag: ct || tag.
func refSeal(key, nonce, msg, ad []byte) []byte {
	var k, n [16]byte
	copy(k[:], key)
	copy(n[:], nonce)
	var s state
	s[0], s[1], s[2], s[3] = xor16(k, n), c1, c0, c1
	s[4], s[5], s[6], s[7] = xor16(k, n), xor16(k, c0), xor16(k, c1), xor16(k, c0)
	for range 10 {
		refUpdate(&s, n, k)
	}
	a := pad32(ad)
	for i := 0; i < len(a); i += 32 {
		a0, a1 := halves(a[i:])
		refUpdate(&s, a0, a1)
	}
	m := pad32(msg)
	ct := make([]byte, 0, len(m)+16)
	for i := 0; i < len(m); i += 32 {
		t0, t1 := halves(m[i:])
		z0 := xor16(xor16(s[6], s[1]), and16(s[2], s[3]))
		z1 := xor16(xor16(s[2], s[5]), and16(s[6], s[7]))
		o0, o1 := xor16(t0, z0), xor16(t1, z1)
		refUpdate(&s, t0, t1)
		ct = append(append(ct, o0[:]...), o1[:]...)
	}
	ct = ct[:len(msg)]
	var l [16]byte
	binary.LittleEndian.PutUint64(l[0:], uint64(len(ad))*8)
	binary.LittleEndian.PutUint64(l[8:], uint64(len(msg))*8)
	tt := xor16(s[2], l)
	for range 7 {
		refUpdate(&s, tt, tt)
	}
	tag := s[0]
	for i := 1; i < 7; i++ {
		tag = xor16(tag, s[i])
	}
	return append(ct, tag[:]...)
}
