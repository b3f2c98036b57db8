package stream

import (
	"crypto/aes"
	"crypto/cipher"
	"testing"
)

// BenchmarkSealChoices measures, on one core, what a keyed stream's
// sealing could cost per byte: the stream's two ciphers, AEGIS-128L and
// AES-256-GCM (newAEAD), AES-GCM with a 128-bit key, and GMAC alone
// (AES-256-GCM over the payload as additional data: authenticated, not
// encrypted), beside a plain copy, in 64 KiB chunks as a Pages frame's runs are sealed. Issue 13's
// time-to-ack goal for the keyed stream (1.3× plain TCP over loopback,
// one core per end with bench --split) needs a sealer far faster than
// the loopback copy; this says how far each choice is from that:
//
//	go test -run '^$' -bench SealChoices -count 5 ./replicate/stream
func BenchmarkSealChoices(b *testing.B) {
	const chunk = 64 << 10
	aead := func(keyLen int) cipher.AEAD {
		blk, err := aes.NewCipher(make([]byte, keyLen))
		if err != nil {
			b.Fatal(err)
		}
		a, err := cipher.NewGCM(blk)
		if err != nil {
			b.Fatal(err)
		}
		return a
	}
	src := make([]byte, chunk)
	for i := range src {
		src[i] = byte(i * 7)
	}
	dst := make([]byte, 0, chunk+tagSize)
	nonce := make([]byte, nonceLen)
	for _, c := range []struct {
		name string
		a    cipher.AEAD
		mac  bool
	}{
		{"aegis128x2", newAEAD(sealAEGISX2, make([]byte, 32)), false},
		{"aegis128l", newAEAD(sealAEGIS, make([]byte, 32)), false},
		{"aes256gcm", newAEAD(sealAESGCM, make([]byte, 32)), false},
		{"aes128gcm", aead(16), false},
		{"gmac256", aead(32), true},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(chunk)
			for range b.N {
				n := nonce[:c.a.NonceSize()]
				if c.mac {
					dst = c.a.Seal(dst[:0], n, nil, src)
				} else {
					dst = c.a.Seal(dst[:0], n, src, nil)
				}
			}
			if len(dst) != tagSize && len(dst) != chunk+tagSize {
				b.Fatalf("sealed %d bytes", len(dst))
			}
		})
	}
	b.Run("copy", func(b *testing.B) {
		out := make([]byte, chunk)
		b.SetBytes(chunk)
		for range b.N {
			copy(out, src)
		}
	})
}
