package aegis

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	require.NoError(t, err)
	return b
}

func needAES(t testing.TB) {
	t.Helper()
	if !Supported() {
		// Every machine this project's CI runs on has AES-NI; say so
		// loudly where one does not, rather than pass quietly.
		t.Fatalf("this CPU cannot run AEGIS-128L (%v)", ErrUnsupported)
	}
}

// TestUpdateVector is RFC 10032's AEGIS-128L Update test vector: one
// absorb of M0 || M1 from a given state.
func TestUpdateVector(t *testing.T) {
	needAES(t)
	var s state
	for i, h := range []string{
		"9b7e60b24cc873ea894ecc07911049a3", "330be08f35300faa2ebf9a7b0d274658",
		"7bbd5bd2b049f7b9b515cf26fbe7756c", "c35a00f55ea86c3886ec5e928f87db18",
		"9ebccafce87cab446396c4334592c91f", "58d83e31f256371e60fc6bb257114601",
		"1639b56ea322c88568a176585bc915de", "640818ffb57dc0fbc2e72ae93457e39a",
	} {
		copy(s[i][:], unhex(t, h))
	}
	m := unhex(t, "033e6975b94816879e42917650955aa0"+"033e6975b94816879e42917650955aa0")
	absorb(&s, m)
	for i, h := range []string{
		"596ab773e4433ca0127c73f60536769d", "790394041a3d26ab697bde865014652d",
		"38cf49e4b65248acd533041b64dd0611", "16d8e58748f437bfff1797f780337cee",
		"69761320f7dd738b281cc9f335ac2f5a", "a21746bb193a569e331e1aa985d0d729",
		"09d714e6fcf9177a8ed1cde7e3d259a6", "61279ba73167f0ab76f0a11bf203bdff",
	} {
		require.Equal(t, h, hex.EncodeToString(s[i][:]), "S%d", i)
	}
}

// TestVectors are RFC 10032's AEGIS-128L test vectors 1-9 (128-bit
// tags): 1-5 seal and open, 6-9 must fail to open.
func TestVectors(t *testing.T) {
	needAES(t)
	const k, n = "10010000000000000000000000000000", "10000200000000000000000000000000"
	for _, v := range []struct {
		name, key, nonce, ad, msg, ct, tag string
		bad                                bool
	}{
		{"1", k, n, "", "00000000000000000000000000000000", "c1c0e58bd913006feba00f4b3cc3594e", "abe0ece80c24868a226a35d16bdae37a", false},
		{"2", k, n, "", "", "", "c2b879a67def9d74e6c14f708bbcc9b4", false},
		{"3", k, n, "0001020304050607",
			"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
			"79d94593d8c2119d7e8fd9b8fc77845c5c077a05b2528b6ac54b563aed8efe84",
			"cc6f3372f6aa1bb82388d695c3962d9a", false},
		{"4", k, n, "0001020304050607", "000102030405060708090a0b0c0d", "79d94593d8c2119d7e8fd9b8fc77",
			"5c04b3dba849b2701effbe32c7f0fab7", false},
		{"5", k, n, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829",
			"101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031323334353637",
			"b31052ad1cca4e291abcf2df3502e6bdb1bfd6db36798be3607b1f94d34478aa7ede7f7a990fec10",
			"7542a745733014f9474417b337399507", false},
		{"6", n, k, "0001020304050607", "", "79d94593d8c2119d7e8fd9b8fc77", "5c04b3dba849b2701effbe32c7f0fab7", true},
		{"7", k, n, "0001020304050607", "", "79d94593d8c2119d7e8fd9b8fc78", "5c04b3dba849b2701effbe32c7f0fab7", true},
		{"8", k, n, "0001020304050608", "", "79d94593d8c2119d7e8fd9b8fc77", "5c04b3dba849b2701effbe32c7f0fab7", true},
		{"9", k, n, "0001020304050607", "", "79d94593d8c2119d7e8fd9b8fc77", "6c04b3dba849b2701effbe32c7f0fab8", true},
	} {
		t.Run(v.name, func(t *testing.T) {
			a, err := New(unhex(t, v.key))
			require.NoError(t, err)
			nonce, ad, ct, tag := unhex(t, v.nonce), unhex(t, v.ad), unhex(t, v.ct), unhex(t, v.tag)
			sealed := append(append([]byte(nil), ct...), tag...)
			got, err := a.Open(nil, nonce, sealed, ad)
			if v.bad {
				require.Error(t, err)
				require.Nil(t, got)
				return
			}
			require.NoError(t, err)
			msg := unhex(t, v.msg)
			require.Equal(t, hex.EncodeToString(msg), hex.EncodeToString(got))
			require.Equal(t, hex.EncodeToString(sealed), hex.EncodeToString(a.Seal(nil, nonce, msg, ad)))
		})
	}
}

// TestAgainstReference seals every length from 0 to 300 bytes, and some
// long ones, with random keys, nonces and associated data, and compares
// with the plain Go model of the RFC (ref_test.go); then opens in place
// and checks that any flipped bit of ciphertext, tag, nonce or
// associated data is refused with the output cleared.
func TestAgainstReference(t *testing.T) {
	needAES(t)
	rnd := func(n int) []byte {
		b := make([]byte, n)
		_, _ = rand.Read(b)
		return b
	}
	lengths := []int{4096, 65536 + 17}
	for n := 0; n <= 300; n++ {
		lengths = append(lengths, n)
	}
	for _, n := range lengths {
		key, nonce, msg, ad := rnd(KeySize), rnd(NonceSize), rnd(n), rnd(n%70)
		a, err := New(key)
		require.NoError(t, err)
		want := refSeal(key, nonce, msg, ad)
		got := a.Seal([]byte("prefix"), nonce, msg, ad)
		require.Equal(t, "prefix", string(got[:6]))
		require.True(t, bytes.Equal(want, got[6:]), "length %d: sealed bytes differ from the reference", n)

		// In place, as the stream opens a part.
		buf := bytes.Clone(want)
		pt, err := a.Open(buf[:0], nonce, buf, ad)
		require.NoError(t, err, "length %d", n)
		require.True(t, bytes.Equal(msg, pt), "length %d: opened bytes differ", n)

		if n > 40 && n%17 != 0 {
			continue // flipping every bit of every length is slow; enough lengths do
		}
		for i := range len(want) {
			bad := bytes.Clone(want)
			bad[i] ^= 1 << (i % 8)
			out := make([]byte, n)
			for j := range out {
				out[j] = 0xa5
			}
			_, err := a.Open(out[:0], nonce, bad, ad)
			require.Error(t, err, "length %d: flipped byte %d opened", n, i)
			require.Equal(t, make([]byte, n), out, "length %d: plaintext left after a failed open", n)
		}
		badNonce := bytes.Clone(nonce)
		badNonce[n%NonceSize] ^= 0x80
		_, err = a.Open(nil, badNonce, want, ad)
		require.Error(t, err)
		_, err = a.Open(nil, nonce, want, append(bytes.Clone(ad), 0))
		require.Error(t, err, "associated data one byte longer opened")
	}
}

func TestRefusals(t *testing.T) {
	needAES(t)
	_, err := New(make([]byte, 32))
	require.Error(t, err)
	a, err := New(make([]byte, KeySize))
	require.NoError(t, err)
	_, err = a.Open(nil, make([]byte, NonceSize), make([]byte, TagSize-1), nil)
	require.Error(t, err, "shorter than a tag")
	require.Panics(t, func() { a.Seal(nil, make([]byte, 12), nil, nil) }, "a GCM-sized nonce")
	buf := make([]byte, 100)
	require.Panics(t, func() { a.Seal(buf[1:1], make([]byte, NonceSize), buf[:50], nil) }, "shifted overlap")
}

// BenchmarkSeal and BenchmarkOpen: 64 KiB, as a keyed stream seals a
// Pages frame's runs (the stream's BenchmarkSealChoices compares with
// AES-256-GCM).
func BenchmarkSeal(b *testing.B) {
	needAES(b)
	a, _ := New(make([]byte, KeySize))
	src := make([]byte, 64<<10)
	dst := make([]byte, 0, len(src)+TagSize)
	nonce := make([]byte, NonceSize)
	b.SetBytes(int64(len(src)))
	for b.Loop() {
		dst = a.Seal(dst[:0], nonce, src, nil)
	}
}

func BenchmarkOpen(b *testing.B) {
	needAES(b)
	a, _ := New(make([]byte, KeySize))
	nonce := make([]byte, NonceSize)
	sealed := a.Seal(nil, nonce, make([]byte, 64<<10), nil)
	buf := make([]byte, len(sealed))
	b.SetBytes(64 << 10)
	for b.Loop() {
		copy(buf, sealed)
		if _, err := a.Open(buf[:0], nonce, buf, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzAgainstReference: for any key, nonce, associated data and
// message, Seal is the plain Go model's, Open takes it back in place,
// and Open refuses it with the last byte of the tag changed.
func FuzzAgainstReference(f *testing.F) {
	f.Add(make([]byte, KeySize), make([]byte, NonceSize), []byte{}, []byte{})
	f.Add(bytes.Repeat([]byte{1}, KeySize), bytes.Repeat([]byte{2}, NonceSize), []byte("header"), bytes.Repeat([]byte("page"), 1000))
	f.Fuzz(func(t *testing.T, key, nonce, ad, msg []byte) {
		if len(key) != KeySize || len(nonce) != NonceSize || !Supported() {
			return
		}
		a, err := New(key)
		if err != nil {
			t.Fatal(err)
		}
		sealed := a.Seal(nil, nonce, msg, ad)
		if want := refSeal(key, nonce, msg, ad); !bytes.Equal(sealed, want) {
			t.Fatalf("sealed %x, the reference %x", sealed, want)
		}
		buf := bytes.Clone(sealed)
		pt, err := a.Open(buf[:0], nonce, buf, ad)
		if err != nil || !bytes.Equal(pt, msg) {
			t.Fatalf("open: %v, %x against %x", err, pt, msg)
		}
		sealed[len(sealed)-1] ^= 1
		if _, err := a.Open(nil, nonce, sealed, ad); err == nil {
			t.Fatal("a changed tag opened")
		}
	})
}
