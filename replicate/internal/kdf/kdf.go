// Package kdf derives the secrets of a replication session from its
// pre-shared key and its handshake: the transcript both peers hash over
// their hellos, and the HMAC-SHA256 proofs and session keys bound to it.
// The checkpoint stream (replicate/stream) and the witness protocol
// (replicate/witness) share it, each under its own label, so that a
// secret of one protocol is never one of the other.
package kdf

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
)

// Transcript hashes the two hellos of a handshake in order (the
// initiator's first), each with its length, under label: the proofs and
// keys derived from it bind every field of both.
func Transcript(label string, first, second []byte) []byte {
	h := sha256.New()
	h.Write([]byte(label + "transcript"))
	var n [4]byte
	for _, p := range [][]byte{first, second} {
		binary.LittleEndian.PutUint32(n[:], uint32(len(p)))
		h.Write(n[:])
		h.Write(p)
	}
	return h.Sum(nil)
}

// Derive is HMAC-SHA256(key, label || purpose || th). With an empty key
// (an insecure session) it still runs, and authenticates nothing.
func Derive(key []byte, label, purpose string, th []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label + purpose))
	m.Write(th)
	return m.Sum(nil)
}
