package stream

// Unkeyed (--insecure) streams: frames in clear, each with a CRC32C.

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// An unkeyed (Insecure) session's frames travel as header, payload in
// clear and a CRC32C: there is no key to seal with. A flipped bit in a
// frame's header, or in the payload of a frame outside a checkpoint's
// sections, is caught as ErrAuth before decoding; a checkpoint section's
// payload (Pages, Disk, State) is left to the End frame's CRC32C
// (TestInsecureCorruptPagesNeverCommitted).
func TestInsecureFramesCarryCRC(t *testing.T) {
	var ctr counters
	var wire bytes.Buffer
	fw := newFrameWriter(&wire, &ctr)
	fw.setPlain()
	msg := appendError(nil, codeAuth, "a message in clear")
	require.NoError(t, fw.write(frameError, msg))
	require.NoError(t, fw.write(frameState, []byte("state")))
	require.NoError(t, fw.flush())
	b := wire.Bytes()
	n := headerSize + len(msg) + crcSize
	require.Len(t, b, n+headerSize+len("state")+crcSize)
	assert.Equal(t, msg, b[headerSize:headerSize+len(msg)], "the payload travels in clear")
	assert.Equal(t, frameCRC(frameError, b[:headerSize], msg), binary.LittleEndian.Uint32(b[n-crcSize:]))
	assert.Equal(t, crc32.Checksum(b[n:n+headerSize], castagnoli), binary.LittleEndian.Uint32(b[len(b)-crcSize:]),
		"a checkpoint section's trailer covers its header")

	read := func(b []byte) (*frame, error) {
		fr := newFrameReader(bytes.NewReader(b), &ctr)
		fr.setPlain()
		return fr.next()
	}
	f, err := read(b[:n])
	require.NoError(t, err)
	assert.Equal(t, frameError, f.typ)
	for _, i := range []int{0, 5, 9, headerSize + 3, n - 1} {
		bad := bytes.Clone(b[:n])
		bad[i] ^= 0x10
		_, err := read(bad)
		require.ErrorIs(t, err, ErrAuth, "byte %d flipped", i)
	}
}

// corruptPagesPair connects an unkeyed pair, the receiver into a MemSink,
// through a proxy that lets corrupt change every Pages frame (its header
// and CRC trailer included) after the handshake.
func corruptPagesPair(t *testing.T, corrupt func(f []byte)) (*Sender, *Receiver, *MemSink) {
	t.Helper()
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Key, scfg.Insecure = nil, true
	rcfg.Key, rcfg.Insecure = nil, true
	sink := NewMemSink()
	rcfg.Sink = sink
	sc, rc := proxyTrailer(t, func(i int, f []byte) [][]byte {
		if i >= 2 && f[4] == byte(framePages) {
			corrupt(f)
		}
		return [][]byte{f}
	}, crcSize)
	s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	return s, r, sink
}

// Without a key, a Pages frame whose payload was corrupted on the way is
// refused at its End (ErrChecksum) if not before: nothing of the
// checkpoint is committed, and the sender hears why.
func TestInsecureCorruptPagesNeverCommitted(t *testing.T) {
	s, r, sink := corruptPagesPair(t, func(f []byte) {
		f[len(f)-crcSize-100] ^= 0x01 // a page's last bytes
	})
	run := runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 4, []byte("state")))
	err := waitErr(t, run)
	require.ErrorIs(t, err, ErrChecksum)
	assert.Zero(t, r.committed.Load(), "nothing committed")
	sink.mu.Lock()
	assert.Empty(t, sink.committed)
	sink.mu.Unlock()
	serr := s.WaitAck(ctxTimeout(t, 5*time.Second), 1)
	require.ErrorIs(t, serr, ErrPeer)
	require.ErrorIs(t, serr, ErrChecksum)
}
