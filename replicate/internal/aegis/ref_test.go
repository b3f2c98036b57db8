package aegis

import (
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"testing"
)

// A plain Go model of AEGIS-128L and AEGIS-128X, written from RFC
// 10032's pseudocode line by line, to check the assembly against at
// every length. Its AES round is the textbook one (FIPS-197 section
// 5.1), with the S-box computed from its definition (inverse in GF(2^8),
// then the affine map) rather than typed in. Slow and not constant-time:
// tests only.

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

// refState is one AEGIS-128L state, S0 … S7.
type refState [8][16]byte

func refUpdate(s *refState, m0, m1 [16]byte) {
	var n refState
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

func block16(b []byte) (x [16]byte) {
	copy(x[:], b)
	return x
}

func padTo(b []byte, n int) []byte {
	p := make([]byte, (len(b)+n-1)/n*n)
	copy(p, b)
	return p
}

// refSealX is the RFC's Encrypt of AEGIS-128X with d lanes (section 5;
// d = 1 is AEGIS-128L), line by line: d AEGIS-128L states, lane i
// updated with the i-th 16 bytes of each half of a block.
func refSealX(d int, key, nonce, msg, ad []byte) []byte {
	k, n := block16(key), block16(nonce)
	v := make([]refState, d)
	for i := range v {
		v[i] = refState{xor16(k, n), c1, c0, c1, xor16(k, n), xor16(k, c0), xor16(k, c1), xor16(k, c0)}
	}
	for range 10 {
		for i := range v {
			var ctx [16]byte
			ctx[0], ctx[1] = byte(i), byte(d-1)
			v[i][3] = xor16(v[i][3], ctx)
			v[i][7] = xor16(v[i][7], ctx)
			refUpdate(&v[i], n, k)
		}
	}
	r := 32 * d                  // the rate, in bytes
	update := func(blk []byte) { // M0 = blk[:16d], M1 = blk[16d:]
		for i := range v {
			refUpdate(&v[i], block16(blk[16*i:]), block16(blk[16*(d+i):]))
		}
	}
	a := padTo(ad, r)
	for i := 0; i < len(a); i += r {
		update(a[i : i+r])
	}
	m := padTo(msg, r)
	ct := make([]byte, 0, len(m)+16)
	for off := 0; off < len(m); off += r {
		out := make([]byte, r)
		for i, s := range v {
			z0 := xor16(xor16(s[6], s[1]), and16(s[2], s[3]))
			z1 := xor16(xor16(s[2], s[5]), and16(s[6], s[7]))
			o0 := xor16(block16(m[off+16*i:]), z0)
			o1 := xor16(block16(m[off+16*(d+i):]), z1)
			copy(out[16*i:], o0[:])
			copy(out[16*(d+i):], o1[:])
		}
		update(m[off : off+r])
		ct = append(ct, out...)
	}
	ct = ct[:len(msg)]
	var u [16]byte
	binary.LittleEndian.PutUint64(u[0:], uint64(len(ad))*8)
	binary.LittleEndian.PutUint64(u[8:], uint64(len(msg))*8)
	for i := range v {
		t := xor16(v[i][2], u)
		for range 7 {
			refUpdate(&v[i], t, t)
		}
	}
	var tag [16]byte
	for i := range v {
		for j := range 7 {
			tag = xor16(tag, v[i][j])
		}
	}
	return append(ct, tag[:]...)
}
