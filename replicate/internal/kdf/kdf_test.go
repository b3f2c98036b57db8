package kdf

import (
	"crypto/hmac"
	"crypto/sha256"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The transcript binds where one hello ends and the next begins, their
// order and the protocol's label.
func TestTranscriptBindsBoundariesOrderAndLabel(t *testing.T) {
	base := Transcript("p/1 ", []byte("ab"), []byte("c"))
	assert.Len(t, base, sha256.Size)
	assert.Equal(t, base, Transcript("p/1 ", []byte("ab"), []byte("c")), "deterministic")
	assert.NotEqual(t, base, Transcript("p/1 ", []byte("a"), []byte("bc")), "boundary")
	assert.NotEqual(t, base, Transcript("p/1 ", []byte("c"), []byte("ab")), "order")
	assert.NotEqual(t, base, Transcript("q/1 ", []byte("ab"), []byte("c")), "label")
}

// Derive is HMAC-SHA256 under the key over label, purpose and transcript,
// so a proof or key of one purpose or protocol is never one of another.
func TestDeriveIsHMACOverLabelPurposeTranscript(t *testing.T) {
	key, th := []byte("0123456789abcdef0123456789abcdef"), Transcript("p/1 ", []byte("s"), []byte("r"))
	m := hmac.New(sha256.New, key)
	m.Write([]byte("p/1 proof sender"))
	m.Write(th)
	assert.Equal(t, m.Sum(nil), Derive(key, "p/1 ", "proof sender", th))
	assert.NotEqual(t, Derive(key, "p/1 ", "proof sender", th), Derive(key, "p/1 ", "proof receiver", th))
	assert.NotEqual(t, Derive(key, "p/1 ", "proof sender", th), Derive(key, "q/1 ", "proof sender", th))
	assert.NotEqual(t, Derive(key, "p/1 ", "proof sender", th), Derive(nil, "p/1 ", "proof sender", th))
}
