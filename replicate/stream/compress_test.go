package stream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// textPage is a compressible page: text with the seed in it.
func textPage(seed uint64) []byte {
	p := bytes.Repeat([]byte(fmt.Sprintf("page %d of a guest's page cache, ", seed)), PageSize)
	return p[:PageSize]
}

// TestCompressionNegotiatedAndPagesArriveWhole replicates checkpoints of
// compressible, incompressible and zero pages under every pairing of
// sender and receiver settings: the two ends agree on one codec, and the
// standby's memory equals what was sent, page by page.
func TestCompressionNegotiatedAndPagesArriveWhole(t *testing.T) {
	tests := []struct {
		sender, receiver Compression
		want             string
	}{
		{CompressDefault, CompressDefault, "none"},
		{CompressS2, CompressDefault, "s2"},
		{CompressS2, CompressZstd, "s2"},
		{CompressZstd, CompressDefault, "zstd"},
		{CompressNone, CompressDefault, "none"},
		{CompressS2, CompressNone, "none"},
		{CompressZstd, CompressNone, "none"},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%v to %v", tt.sender, tt.receiver), func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			scfg.Compression, rcfg.Compression = tt.sender, tt.receiver
			sink := NewMemSink()
			rcfg.Sink = sink
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			const n = 600 // more than two frames
			want := make(map[GPA][]byte)
			for epoch := uint64(1); epoch <= 3; epoch++ {
				require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
				for i := range n {
					var p []byte
					switch (i + int(epoch)) % 4 {
					case 0:
						p = page(epoch*1000 + uint64(i))
					case 1:
						p = make([]byte, PageSize)
					default:
						p = textPage(epoch*1000 + uint64(i))
					}
					gpa := GPA(i * PageSize)
					want[gpa] = p
					require.NoError(t, s.SendPage(gpa, p))
				}
				require.NoError(t, s.SendState([]byte("state")))
				require.NoError(t, s.EndCheckpoint())
			}
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 3))
			for gpa, p := range want {
				require.Equal(t, p, sink.Page(gpa), "page %#x", uint64(gpa))
			}
			st, rt := s.Stats(), r.Stats()
			assert.Equal(t, tt.want, st.Compression)
			assert.Equal(t, tt.want, rt.Compression)
			if tt.want == "none" {
				frames := uint64(3 * 3) // three checkpoints of three Pages frames
				assert.Equal(t, st.PageBytes+pagesHeader*frames, st.PageWireBytes, "stored: the section and its header")
			} else {
				assert.Less(t, st.PageWireBytes, st.PageBytes*2/3, "compressed")
			}
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

// TestPagesDecodeRefusesBadData feeds the page decoder forged and
// corrupted Pages payloads: each is refused with a sentinel, none panics,
// and nothing decodes past the cap.
func TestPagesDecodeRefusesBadData(t *testing.T) {
	var sec container.PageSection
	for i := range 200 {
		sec.Add(uint64(i*PageSize), textPage(uint64(i)))
	}
	section := append([]byte(nil), sec.Payload()...)
	bomb := newPageCodec(codecZstd).encode(make([]byte, container.MaxPagesPayload))
	bombS2 := newPageCodec(codecS2).encode(make([]byte, container.MaxPagesPayload))
	tests := []struct {
		name    string
		session codec
		payload []byte
		want    error
	}{
		{"short header", codecS2, []byte{1, 0, 0}, ErrFrame},
		{"reserved bytes", codecS2, func() []byte { p := stored(section); p[2] = 1; return p }(), ErrFrame},
		{"codec not agreed", codecZstd, compressed(codecS2, section), ErrFrame},
		{"compressed on a stored session", codecStored, compressed(codecZstd, section), ErrFrame},
		{"unknown codec", codecS2, func() []byte { p := compressed(codecS2, section); p[0] = 7; return p }(), ErrFrame},
		{"stored length lies", codecS2, withLength(stored(section), len(section)-1), ErrFrame},
		{"s2 length lies", codecS2, withLength(compressed(codecS2, section), len(section)+1), ErrFrame},
		{"zstd length lies", codecZstd, withLength(compressed(codecZstd, section), len(section)-1), ErrFrame},
		{"s2 corrupted", codecS2, corrupt(compressed(codecS2, section)), ErrFrame},
		{"zstd corrupted", codecZstd, corrupt(compressed(codecZstd, section)), ErrFrame},
		{"s2 truncated", codecS2, compressed(codecS2, section)[:100], ErrFrame},
		{"zstd truncated", codecZstd, compressed(codecZstd, section)[:100], ErrFrame},
		{"length over the cap", codecS2, withLength(compressed(codecS2, section), container.MaxPagesPayload+1), ErrTooLarge},
		{"zstd decodes past its announced length", codecZstd, withLength(append([]byte(nil), bomb...), 4096), ErrFrame},
		{"s2 decodes past its announced length", codecS2, withLength(append([]byte(nil), bombS2...), 4096), ErrFrame},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := newPageCodec(tt.session).decode(tt.payload)
			require.ErrorIs(t, err, tt.want)
		})
	}
	// And the good ones, for contrast.
	for _, c := range []codec{codecStored, codecS2, codecZstd} {
		got, err := newPageCodec(c).decode(compressed(c, section))
		require.NoError(t, err, "%v", c)
		require.Equal(t, section, got, "%v", c)
	}
}

// TestSenderHelloWithTwoCodecsRefused: a sender names the one codec it
// will use.
func TestSenderHelloWithTwoCodecsRefused(t *testing.T) {
	p := appendHello(nil, &hello{version: Version, role: roleSender, codecs: helloCodecFlags, id: testIdentity(),
		heartbeat: DefaultHeartbeatInterval, timeout: DefaultFailoverTimeout})
	var h hello
	require.ErrorIs(t, decodeHello(&h, p), ErrFrame)
	p = appendHello(nil, &hello{version: Version, role: roleReceiver, codecs: helloCodecFlags,
		heartbeat: DefaultHeartbeatInterval, timeout: DefaultFailoverTimeout})
	require.NoError(t, decodeHello(&h, p), "a receiver accepts several")
	assert.Equal(t, uint16(helloCodecFlags), h.codecs)
}

// Disk frames travel compressed with the session's codec too (version
// 12): text and random writes and a zero run land on the standby's disk
// as they were sent, keyed and unkeyed; compressible writes take fewer
// bytes on the wire, incompressible ones go stored, and a disk section
// that claims more than MaxDiskPayload is refused.
func TestDiskFramesCompressed(t *testing.T) {
	text := bytes.Repeat([]byte("a file the guest wrote to its disk, "), (3<<20)/36)
	random := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	for _, tt := range []struct {
		c     Compression
		keyed bool
	}{{CompressNone, true}, {CompressS2, false}, {CompressS2, true}, {CompressZstd, true}} {
		t.Run(fmt.Sprintf("%v keyed %v", tt.c, tt.keyed), func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			if !tt.keyed {
				scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
			}
			scfg.Compression = tt.c
			disks := newMemDisks(8 << 20)
			rcfg.Disks = disks
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			require.NoError(t, s.BeginCheckpoint(1, KindEpoch))
			require.NoError(t, s.SendDisk(0, 4096, text))
			require.NoError(t, s.SendDiskZero(0, 4<<20, 1<<20))
			require.NoError(t, s.SendDisk(0, 6<<20, random))
			require.NoError(t, s.EndCheckpoint())
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1))
			want := make([]byte, 8<<20)
			copy(want[4096:], text)
			copy(want[6<<20:], random)
			require.True(t, bytes.Equal(want, disks.disk(0)), "the standby's disk holds what was sent")
			st := s.Stats()
			require.Equal(t, st.DiskBytes, r.Stats().DiskBytes)
			raw := uint64(len(text) + len(random))
			if tt.c == CompressNone {
				frames := uint64(3 + 1 + 1) // text in three frames, a zero run, random
				assert.Equal(t, raw+frames*(pagesHeader+container.DiskHeaderSize), st.DiskWireBytes, "stored")
			} else {
				assert.Less(t, st.DiskWireBytes, uint64(len(random))+raw/10, "the text compressed")
				assert.Greater(t, st.DiskWireBytes, uint64(len(random)), "the random write could not")
			}
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
	section := container.AppendDisk(nil, 0, 0, 4096, textPage(1))
	over := withLength(compressed(codecS2, section), container.MaxDiskPayload+1)
	_, err := newPageCodec(codecS2).decodeFrame(frameDisk, new([]byte), over)
	require.ErrorIs(t, err, ErrTooLarge)
	got, err := newPageCodec(codecS2).decodeFrame(frameDisk, new([]byte), compressed(codecS2, section))
	require.NoError(t, err)
	require.Equal(t, section, got)
}

// withLength sets the section length in a Pages or Disk payload's header.
func withLength(p []byte, n int) []byte {
	binary.LittleEndian.PutUint32(p[4:], uint32(n))
	return p
}
