package stream

import (
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

var updateSeeds = flag.Bool("update", false, "rewrite the fuzz seed corpus in testdata/")

// rawFrame builds header + plaintext payload + a trailer of the size the
// wire carries: a MAC for the handshake frames, an AES-GCM tag for the
// rest (the decoder ignores the trailer; the stream authenticates and
// decrypts before decoding).
func rawFrame(t frameType, seq uint64, payload []byte) []byte {
	trailer := tagSize
	if t == frameHello || t == frameAuth {
		trailer = macSize
	}
	b := make([]byte, headerSize, headerSize+len(payload)+trailer)
	putHeader(b, header{length: uint32(len(payload)), typ: t, seq: seq})
	b = append(b, payload...)
	return append(b, make([]byte, trailer)...)
}

// corrupt flips a byte in the middle of a compressed Pages payload.
func corrupt(p []byte) []byte {
	p[pagesHeader+(len(p)-pagesHeader)/2] ^= 0x5a
	return p
}

// stateXORPayload marks a State frame payload as an XOR chunk.
func stateXORPayload(p []byte) []byte {
	p[1] = stateXOR
	return p
}

// seedFrames are well-formed frames of every type, plus a few near misses.
func seedFrames() map[string][]byte {
	id := testIdentity()
	pages := appendPageEntry([]byte{3, 0, 0, 0}, 0, container.EncRaw, page(1))
	pages = appendPageEntry(pages, PageSize, container.EncZero, nil)
	pages = appendPageEntry(pages, 1<<32, container.EncRaw, page(2))
	return map[string][]byte{
		"hello-sender": rawFrame(frameHello, 0, appendHello(nil, &hello{version: Version, keyed: true, role: roleSender, id: id,
			heartbeat: DefaultHeartbeatInterval, timeout: DefaultFailoverTimeout})),
		"hello-witnessed": rawFrame(frameHello, 0, appendHello(nil, &hello{version: Version, keyed: true, role: roleSender, id: witnessed(id),
			heartbeat: DefaultHeartbeatInterval, timeout: DefaultFailoverTimeout})),
		"hello-receiver": rawFrame(frameHello, 0, appendHello(nil, &hello{version: Version, role: roleReceiver,
			heartbeat: DefaultHeartbeatInterval, timeout: DefaultFailoverTimeout})),
		"auth":  rawFrame(frameAuth, 1, make([]byte, macSize)),
		"begin": rawFrame(frameBegin, 2, appendBegin(nil, 7, KindEpoch)),
		"pages": rawFrame(framePages, 3, stored(pages)),
		"pages-grouped": rawFrame(framePages, 3, stored(container.AppendGroupedSection(nil, []container.Page{
			{GPA: 0, Enc: container.EncRaw, Data: page(1)}, {GPA: PageSize, Enc: container.EncZero}, {GPA: 1 << 32, Enc: container.EncRaw, Data: page(2)}}))),
		"pages-s2":     rawFrame(framePages, 3, compressed(codecS2, pages)),
		"pages-xor":    rawFrame(framePages, 3, compressed(codecS2, appendPageEntry([]byte{1, 0, 0, 0}, PageSize, container.EncXOR, make([]byte, container.XORSize)))),
		"pages-zstd":   rawFrame(framePages, 3, compressed(codecZstd, pages)),
		"pages-copy":   rawFrame(framePages, 3, stored(appendPageEntry([]byte{1, 0, 0, 0}, PageSize, container.EncCopy, copyData(0xdeadbeef, 1<<32)))),
		"state":        rawFrame(frameState, 4, stored([]byte("machine state"))),
		"state-s2-xor": rawFrame(frameState, 4, stateXORPayload(compressed(codecS2, bytes.Repeat([]byte{0}, 4096)))),
		"state-zstd":   rawFrame(frameState, 4, compressed(codecZstd, bytes.Repeat([]byte("machine state "), 300))),
		"end":          rawFrame(frameEnd, 5, appendEnd(nil, endInfo{epoch: 7, pages: 3, stateLen: 13, diskBytes: 8192, sum: 0xdeadbeef})),
		"disk":         rawFrame(frameDisk, 6, diskPayload(1, 4096, 5, []byte("hello"))),
		"disk-zero":    rawFrame(frameDisk, 6, diskPayload(0, 0, MaxDiskChunk, nil)),
		"disk-s2":      rawFrame(frameDisk, 6, compressed(codecS2, container.AppendDisk(nil, 1, 4096, 8192, bytes.Repeat([]byte("disk "), 8192/5+1)[:8192]))),
		"disk-zstd":    rawFrame(frameDisk, 6, compressed(codecZstd, container.AppendDisk(nil, 1, 4096, 8192, bytes.Repeat([]byte("disk "), 8192/5+1)[:8192]))),
		"bad-disk-s2":  rawFrame(frameDisk, 6, corrupt(compressed(codecS2, container.AppendDisk(nil, 1, 4096, 8192, bytes.Repeat([]byte("disk "), 8192/5+1)[:8192])))),
		"accept":       rawFrame(frameAccept, 2, nil),
		"handover":     rawFrame(frameHandover, 10, nil),
		"bad-disk":     rawFrame(frameDisk, 6, diskPayload(MaxDisks, 0, 1, []byte{1})),
		"ack":          rawFrame(frameAck, 2, []byte{7, 0, 0, 0, 0, 0, 0, 0}),
		"heartbeat":    rawFrame(frameHeartbeat, 3, []byte{1, 2, 3, 4, 5, 6, 7, 8}),
		"error":        rawFrame(frameError, 4, appendError(nil, codeAuth, "authentication failed")),
		"goodbye":      rawFrame(frameGoodbye, 9, nil),
		"bad-gpa":      rawFrame(framePages, 3, stored(appendPageEntry([]byte{1, 0, 0, 0}, 1<<31, container.EncZero, nil))),
		"bad-encoding": rawFrame(framePages, 3, stored(appendPageEntry([]byte{1, 0, 0, 0}, 0, container.EncXOR, []byte{9, 9}))),
		"bad-s2":       rawFrame(framePages, 3, corrupt(compressed(codecS2, pages))),
		"bad-zstd":     rawFrame(framePages, 3, corrupt(compressed(codecZstd, pages))),
		"huge-length":  {0xff, 0xff, 0xff, 0x7f, byte(framePages), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
	}
}

// TestSeedCorpus checks that the seeds decode as intended and, with
// -update, rewrites testdata/fuzz/FuzzDecodeFrame.
func TestSeedCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDecodeFrame")
	for name, b := range seedFrames() {
		_, _, err := DecodeFrame(b, testIdentity())
		bad := name == "bad-gpa" || name == "bad-encoding" || name == "huge-length" || name == "bad-disk" ||
			name == "bad-s2" || name == "bad-zstd" || name == "bad-disk-s2"
		require.Equal(t, bad, err != nil, "%s: %v", name, err)
		path := filepath.Join(dir, name)
		content := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", b)
		if *updateSeeds {
			require.NoError(t, os.MkdirAll(dir, 0o755))
			require.NoError(t, os.WriteFile(path, []byte(content), 0o644))
			continue
		}
		got, err := os.ReadFile(path)
		require.NoError(t, err, "seed missing: run go test -run TestSeedCorpus -update")
		require.Equal(t, content, string(got), "seed %s is stale: run with -update", name)
	}
}

var sentinels = []error{ErrAuth, ErrFrame, ErrTooLarge, ErrOutOfRange, ErrVersion, ErrMismatch,
	ErrProtocol, ErrChecksum, ErrTruncated}

// FuzzDecodeFrame feeds arbitrary bytes to the frame decoder: it must
// never panic, every refusal must wrap one of the package's sentinels, and
// every accepted frame must respect the caps.
func FuzzDecodeFrame(f *testing.F) {
	for _, b := range seedFrames() {
		f.Add(b)
	}
	layout := testIdentity()
	f.Fuzz(func(t *testing.T, data []byte) {
		// As a session that agreed on each codec would read it.
		for _, c := range []codec{codecStored, codecS2, codecZstd} {
			checkDecode(t, data, &layout, c, c == codecS2)
		}
	})
}

func checkDecode(t *testing.T, data []byte, layout *Identity, c codec, deltas bool) {
	{
		fr := frame{zc: newPageCodec(c), deltas: deltas}
		n, err := decodeFrame(&fr, data, layout)
		if err != nil {
			for _, s := range sentinels {
				if errors.Is(err, s) {
					return
				}
			}
			t.Fatalf("error wraps no sentinel: %v", err)
		}
		if n < headerSize || n > len(data) || n-headerSize > MaxFramePayload {
			t.Fatalf("consumed %d of %d bytes", n, len(data))
		}
		switch fr.typ {
		case frameHello:
			if fr.hello.version != Version {
				t.Fatalf("accepted version %d", fr.hello.version)
			}
			if fr.hello.heartbeat <= 0 || fr.hello.timeout < 2*fr.hello.heartbeat || fr.hello.timeout > MaxTimeout {
				t.Fatalf("accepted heartbeat %v timeout %v", fr.hello.heartbeat, fr.hello.timeout)
			}
			if fr.hello.role == roleSender || !fr.hello.id.IsZero() {
				if err := fr.hello.id.Validate(); err != nil {
					t.Fatalf("accepted invalid identity: %v", err)
				}
			}
		case framePages:
			if len(fr.pages) == 0 || len(fr.pages) > MaxPagesPerFrame {
				t.Fatalf("accepted %d pages", len(fr.pages))
			}
			for _, p := range fr.pages {
				if !layout.Contains(GPA(p.GPA)) {
					t.Fatalf("accepted page %#x outside the layout", p.GPA)
				}
				switch {
				case p.Enc == container.EncRaw && len(p.Data) == PageSize:
				case p.Enc == container.EncZero && p.Data == nil:
				case p.Enc == container.EncXOR && deltas && len(p.Data) == container.XORSize:
				case p.Enc == container.EncCopy && deltas && len(p.Data) == container.CopySize &&
					binary.LittleEndian.Uint64(p.Data[4:])%PageSize == 0:
				default:
					t.Fatalf("accepted page %#x encoding %d with %d bytes", p.GPA, p.Enc, len(p.Data))
				}
			}
		case frameState:
			if len(fr.data) == 0 || len(fr.data) > MaxStateChunk {
				t.Fatalf("accepted state chunk of %d bytes", len(fr.data))
			}
		case frameBegin:
			if fr.epoch == 0 || fr.kind < KindInitialSync || fr.kind > KindFinal {
				t.Fatalf("accepted begin %d %v", fr.epoch, fr.kind)
			}
		case frameEnd:
			if fr.end.stateLen > MaxState {
				t.Fatalf("accepted end with state %d", fr.end.stateLen)
			}
		case frameDisk:
			w := fr.disk
			if w.Disk >= MaxDisks || w.Length == 0 || w.Length > MaxDiskChunk || w.Off+uint64(w.Length) > math.MaxInt64 ||
				(w.Zero && w.Data != nil) || (!w.Zero && len(w.Data) != w.Length) {
				t.Fatalf("accepted disk write %+v", w)
			}
		case frameError:
			if len(fr.data) > MaxErrorMessage {
				t.Fatalf("accepted error message of %d bytes", len(fr.data))
			}
		}
	}
}
