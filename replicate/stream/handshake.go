package stream

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"time"

	"govmm/replicate/internal/kdf"
)

const label = "govmm-stream/1 "

// transcript hashes both hellos (kdf.Transcript), so that the proofs and
// session keys bind every field of them (identity, flags, nonces).
func transcript(senderHello, receiverHello []byte) []byte {
	return kdf.Transcript(label, senderHello, receiverHello)
}

// derive is kdf.Derive under this protocol's label.
func derive(key []byte, purpose string, th []byte) []byte { return kdf.Derive(key, label, purpose, th) }

// handshake runs the four-message handshake (see docs/STREAM.md) on e's
// connection as role r, leaves e's reader and writer on session keys and
// sets the agreed failover timeout. The sender then also waits for the
// receiver's verdict (Accept, or an Error frame); the receiver gives it
// with verdict. The whole exchange is bounded by HandshakeTimeout and ctx.
func (e *endpoint) handshake(ctx context.Context, r role) (err error) {
	deadline := time.Now().Add(e.cfg.HandshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = e.conn.SetDeadline(deadline)
	e.dw.until(deadline)
	stop := context.AfterFunc(ctx, func() {
		_ = e.conn.SetDeadline(time.Unix(1, 0))
		e.dw.until(time.Unix(1, 0))
	})
	defer func() {
		if !stop() && err == nil {
			err = ctx.Err()
		}
		if err != nil {
			if ctx.Err() != nil {
				err = fmt.Errorf("handshake: %w (%w)", ctx.Err(), err)
			}
			err = e.fail(fmt.Errorf("handshake: %w", err), e.fr.start)
			return
		}
		_ = e.conn.SetDeadline(time.Time{})
		e.dw.until(time.Time{})
	}()

	own := hello{version: Version, keyed: len(e.cfg.Key) > 0, role: r, id: e.cfg.Identity,
		heartbeat: e.cfg.HeartbeatInterval, timeout: e.cfg.FailoverTimeout}
	_, _ = rand.Read(own.nonce[:]) // crypto/rand.Read never fails
	switch {
	case e.cfg.Compression == CompressNone:
	case r == roleReceiver:
		own.codecs = helloCodecFlags
	case e.cfg.Compression != CompressDefault:
		own.codecs = 1 << e.cfg.Compression.codec()
	case DefaultCompression != CompressNone:
		own.codecs = 1 << DefaultCompression.codec()
	}
	own.deltas = e.cfg.Deltas
	own.aegis = own.keyed && e.cfg.Cipher.offersAEGIS()
	own.aegisX2 = own.keyed && e.cfg.Cipher.offersAEGISX2()
	if r == roleSender {
		return e.handshakeAsSender(&own)
	}
	return e.handshakeAsReceiver(&own)
}

// handshakeAsSender: Hello →, ← Hello, Auth →, ← Auth, ← Accept.
func (e *endpoint) handshakeAsSender(own *hello) error {
	ownBytes := appendHello(nil, own)
	if err := e.sendRaw(frameHello, ownBytes); err != nil {
		return err
	}
	peerBytes, peer, err := e.recvHello(roleReceiver, own.keyed)
	if err != nil {
		return err
	}
	if err := e.chooseCipher(own, peer); err != nil {
		return err
	}
	th := transcript(ownBytes, peerBytes)
	if err := e.sendRaw(frameAuth, derive(e.cfg.Key, "proof sender", th)); err != nil {
		return err
	}
	e.session(e.fw, "key sender-to-receiver", th)
	if err := e.verifyProof(th, "receiver"); err != nil {
		return err
	}
	e.session(e.fr, "key receiver-to-sender", th)
	if !peer.id.IsZero() {
		if err := e.cfg.Identity.Mismatch(peer.id); err != nil {
			return err
		}
	}
	e.peer = peer.id
	e.agree(peer)
	e.setCodec(own.codecs, peer.codecs, roleSender)
	e.setDeltas(own.deltas && peer.deltas, e.cfg.Identity)
	// The receiver's verdict on us: it may still refuse the VM.
	_, err = e.recvFrame(frameAccept)
	return err
}

// handshakeAsReceiver: ← Hello, Hello →, ← Auth, Auth →.
func (e *endpoint) handshakeAsReceiver(own *hello) error {
	ownBytes := appendHello(nil, own)
	peerBytes, peer, err := e.recvHello(roleSender, own.keyed)
	if err != nil {
		return err
	}
	if err := e.sendRaw(frameHello, ownBytes); err != nil {
		return err
	}
	if err := e.chooseCipher(own, peer); err != nil {
		return err
	}
	th := transcript(peerBytes, ownBytes)
	if err := e.verifyProof(th, "sender"); err != nil {
		return err
	}
	e.session(e.fr, "key sender-to-receiver", th)
	if !e.cfg.Identity.IsZero() {
		if err := e.cfg.Identity.Mismatch(peer.id); err != nil {
			return err
		}
	}
	if err := e.sendRaw(frameAuth, derive(e.cfg.Key, "proof receiver", th)); err != nil {
		return err
	}
	e.session(e.fw, "key receiver-to-sender", th)
	e.peer = peer.id
	e.fr.layout = peer.id
	e.agree(peer)
	e.setCodec(peer.codecs, own.codecs, roleReceiver)
	e.setDeltas(own.deltas && peer.deltas, peer.id)
	return nil
}

// session installs a direction's session framing once the handshake
// frames are done: the session's cipher (e.cipher) under the key derived
// for purpose; with no key (Insecure), whose derived key anyone could
// compute and which would seal for show, a CRC32C trailer that catches
// corruption and nothing else.
func (e *endpoint) session(s interface {
	setKey(sessionCipher, []byte)
	setPlain()
}, purpose string, th []byte) {
	if len(e.cfg.Key) == 0 {
		s.setPlain()
		return
	}
	s.setKey(e.cipher, derive(e.cfg.Key, sessionPurpose(e.cipher, purpose), th))
	e.sealed = true
}

// chooseCipher sets the session's cipher from the two hellos:
// AEGIS-128X2 if both offer it, else AEGIS-128L if both offer it, else
// AES-256-GCM, which every end runs. An end whose Config asks for an
// AEGIS refuses a peer that does not offer it.
func (e *endpoint) chooseCipher(own, peer *hello) error {
	switch {
	case own.aegisX2 && peer.aegisX2:
		e.cipher = sealAEGISX2
	case own.aegis && peer.aegis:
		e.cipher = sealAEGIS
	default:
		e.cipher = sealAESGCM
	}
	if want, ok := e.cfg.Cipher.session(); own.keyed && ok && e.cipher != want {
		why := "its CPU lacks AES-NI and AVX"
		if want == sealAEGISX2 {
			why = "its CPU lacks VAES"
		}
		return fmt.Errorf("peer does not seal with %v (%s, or it asks for another cipher) and this end requires it: %w", want, why, ErrAuth)
	}
	if own.keyed {
		e.log.Debug("stream sealed", "cipher", e.cipher)
	}
	return nil
}

// summed reports whether the End frame's sum covers a section that
// travelled stored (as it is applied: a stored Pages frame's section, a
// Disk or a State frame's payload), or a Pages frame's section that
// travelled compressed (stored false). Without a key the sum covers
// every section: it is the only check of their bytes (the CRC32C trailer
// leaves them out). In a sealed session (version 10) it covers only the
// decompressed sections: AES-256-GCM authenticates every byte of a stored
// section as the receiver applies it, with the frame's sequence number,
// so the sum would check those bytes a second time; what the tag does not
// cover is what the decompressor made of the bytes it authenticated.
func (e *endpoint) summed(stored bool) bool { return sums(e.sealed, stored) }

// sums is the rule of summed, for a session sealed or not: a receiver's
// reader, which sums the sections it reads (frameReader.sumFrame), has
// no endpoint.
func sums(sealed, stored bool) bool { return !sealed || !stored }

// setDeltas turns deltas on when both hellos asked for them, with a
// fresh shadow of the sender's layout: nothing was shipped on this
// stream yet.
func (e *endpoint) setDeltas(on bool, layout Identity) {
	e.fr.deltas = on
	if on {
		e.shadow = newShadow(layout)
	} else if e.cfg.Deltas {
		e.log.Warn("peer does not take deltas; pages travel whole")
	}
}

// setCodec sets the session's page codec from the two hellos' codec
// flags: the sender's, if the receiver accepts it.
func (e *endpoint) setCodec(senderCodecs, receiverCodecs uint16, r role) {
	e.codec = negotiate(senderCodecs, receiverCodecs)
	e.fr.zc = newPageCodec(e.codec)
	if r == roleSender && senderCodecs != 0 && e.codec == codecStored {
		e.log.Warn("peer does not take compressed pages; sending them uncompressed", "wanted", e.cfg.Compression)
	}
}

// recvFrame reads the next handshake frame, which must be of type want
// (or an Error frame, returned as the peer's error).
func (e *endpoint) recvFrame(want frameType) (*frame, error) {
	f, err := e.fr.next()
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("connection closed before the %v frame: %w", want, ErrTruncated)
	}
	if err != nil {
		return nil, err
	}
	if f.typ == frameError {
		return nil, peerError(f.code, string(f.data))
	}
	if f.typ != want {
		return nil, fmt.Errorf("got %v frame, want %v: %w", f.typ, want, ErrProtocol)
	}
	return f, nil
}

// recvHello reads the peer's hello and checks its role and keying; it
// returns the hello's payload (for the transcript) and the hello.
func (e *endpoint) recvHello(wantRole role, keyed bool) ([]byte, *hello, error) {
	f, err := e.recvFrame(frameHello)
	if err != nil {
		return nil, nil, err
	}
	if f.hello.role != wantRole {
		return nil, nil, fmt.Errorf("peer hello has role %d, want %d: %w", f.hello.role, wantRole, ErrProtocol)
	}
	if f.hello.keyed != keyed {
		if keyed {
			return nil, nil, fmt.Errorf("peer has no key and this side requires one: %w", ErrAuth)
		}
		return nil, nil, fmt.Errorf("peer requires a key and this side has none: %w", ErrAuth)
	}
	h := f.hello
	return append([]byte(nil), f.payload...), &h, nil
}

// verifyProof reads the peer's Auth and checks its proof of the key.
func (e *endpoint) verifyProof(th []byte, peerRole string) error {
	f, err := e.recvFrame(frameAuth)
	if err != nil {
		return err
	}
	if !hmac.Equal(f.proof[:], derive(e.cfg.Key, "proof "+peerRole, th)) {
		return fmt.Errorf("peer's proof does not verify (wrong key, or not our peer): %w", ErrAuth)
	}
	return nil
}

// agree sets the failover timeout both ends use: the larger of the two,
// so that neither end declares the other dead sooner than that one
// expects. The stall timeout follows it.
func (e *endpoint) agree(peer *hello) {
	e.timeout = max(e.cfg.FailoverTimeout, peer.timeout)
	e.dw.setStall(max(e.cfg.StallTimeout, 4*e.timeout))
	if e.timeout != e.cfg.FailoverTimeout {
		e.log.Info("failover timeout raised to the peer's", "own", e.cfg.FailoverTimeout, "agreed", e.timeout)
	}
}

// sendRaw writes and flushes one frame without failing the stream on error
// (the handshake reports its own errors).
func (e *endpoint) sendRaw(t frameType, payload []byte) error {
	e.wmu.Lock()
	defer e.wmu.Unlock()
	if err := e.fw.write(t, payload); err != nil {
		return err
	}
	return e.fw.flush()
}
