package stream

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

const label = "govmm-stream/1 "

// transcript hashes both hellos, so that the proofs and session keys bind
// every field of them (identity, flags, nonces).
func transcript(senderHello, receiverHello []byte) []byte {
	h := sha256.New()
	h.Write([]byte(label + "transcript"))
	var n [4]byte
	for _, p := range [][]byte{senderHello, receiverHello} {
		binary.LittleEndian.PutUint32(n[:], uint32(len(p)))
		h.Write(n[:])
		h.Write(p)
	}
	return h.Sum(nil)
}

// derive is HMAC-SHA256(key, label || purpose || transcript). With no key
// (Insecure) it still runs, over an empty key, and authenticates nothing.
func derive(key []byte, purpose string, th []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label + purpose))
	m.Write(th)
	return m.Sum(nil)
}

// handshake runs the four-message handshake (see docs/STREAM.md) on e's
// connection as role r, leaves e's reader and writer on session keys and
// sets the agreed failover timeout. The sender then also waits for the
// receiver's verdict (Accept, or an Error frame); the receiver gives it
// with verdict.
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

	keyed := len(e.cfg.Key) > 0
	own := hello{version: Version, keyed: keyed, role: r, id: e.cfg.Identity,
		heartbeat: e.cfg.HeartbeatInterval, timeout: e.cfg.FailoverTimeout}
	_, _ = rand.Read(own.nonce[:]) // crypto/rand.Read never fails
	ownBytes := appendHello(nil, &own)

	sendHello := func() error {
		return e.sendRaw(frameHello, ownBytes)
	}
	recv := func(want frameType) (*frame, error) {
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
	recvHello := func(wantRole role) ([]byte, *hello, error) {
		f, err := recv(frameHello)
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
	verify := func(th []byte, peerRole string) error {
		f, err := recv(frameAuth)
		if err != nil {
			return err
		}
		if !hmac.Equal(f.proof[:], derive(e.cfg.Key, "proof "+peerRole, th)) {
			return fmt.Errorf("peer's proof does not verify (wrong key, or not our peer): %w", ErrAuth)
		}
		return nil
	}
	agree := func(peer *hello) {
		// The larger timeout wins: neither end declares the other dead
		// sooner than that one expects.
		e.timeout = max(e.cfg.FailoverTimeout, peer.timeout)
		e.dw.setStall(max(e.cfg.StallTimeout, 4*e.timeout))
		if e.timeout != e.cfg.FailoverTimeout {
			e.log.Info("failover timeout raised to the peer's", "own", e.cfg.FailoverTimeout, "agreed", e.timeout)
		}
	}

	if r == roleSender {
		if err := sendHello(); err != nil {
			return err
		}
		peerBytes, peer, err := recvHello(roleReceiver)
		if err != nil {
			return err
		}
		th := transcript(ownBytes, peerBytes)
		if err := e.sendRaw(frameAuth, derive(e.cfg.Key, "proof sender", th)); err != nil {
			return err
		}
		e.fw.setKey(derive(e.cfg.Key, "key sender-to-receiver", th))
		if err := verify(th, "receiver"); err != nil {
			return err
		}
		e.fr.setKey(derive(e.cfg.Key, "key receiver-to-sender", th))
		if !peer.id.IsZero() {
			if err := e.cfg.Identity.Mismatch(peer.id); err != nil {
				return err
			}
		}
		e.peer = peer.id
		agree(peer)
		// The receiver's verdict on us: it may still refuse the VM.
		_, err = recv(frameAccept)
		return err
	}

	peerBytes, peer, err := recvHello(roleSender)
	if err != nil {
		return err
	}
	if err := sendHello(); err != nil {
		return err
	}
	th := transcript(peerBytes, ownBytes)
	if err := verify(th, "sender"); err != nil {
		return err
	}
	e.fr.setKey(derive(e.cfg.Key, "key sender-to-receiver", th))
	if !e.cfg.Identity.IsZero() {
		if err := e.cfg.Identity.Mismatch(peer.id); err != nil {
			return err
		}
	}
	if err := e.sendRaw(frameAuth, derive(e.cfg.Key, "proof receiver", th)); err != nil {
		return err
	}
	e.fw.setKey(derive(e.cfg.Key, "key receiver-to-sender", th))
	e.peer = peer.id
	e.fr.layout = peer.id
	agree(peer)
	return nil
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
