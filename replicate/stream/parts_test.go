package stream

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
	"govmm/vmm/guestmem"
)

// headOf builds the part 0 of a frame sealed in parts for entries whose
// pattern says which carry data ('r') and which are zero pages ('z'), as
// a Sender does (pageSlot), and returns it with the data's length.
func headOf(pattern string) ([]byte, int) {
	var sl pageSlot
	sl.reset()
	pg := make([]byte, PageSize)
	for i, c := range pattern {
		sl.addRef(uint64(i*PageSize), pg, c == 'z', nil)
	}
	sl.closeRefs()
	return sl.pieces[0], sl.raw * PageSize
}

// A frame sealed in parts is cut after its head, then at every zero
// page: each run of pages with data is a part.
func TestSealedParts(t *testing.T) {
	for _, tt := range []struct {
		pattern string
		want    []int // in pages
	}{
		{"r", []int{1}},
		{"rrrr", []int{4}},
		{"rrzr", []int{2, 1}},
		{"zrrz", []int{2}},
		{"zzrzzrrrz", []int{1, 3}},
		{"rz" + string(bytes.Repeat([]byte("rz"), 127)), make128(1)},
		{string(bytes.Repeat([]byte("r"), MaxPagesPerFrame)), []int{MaxPagesPerFrame}},
	} {
		t.Run(fmt.Sprintf("%.12s", tt.pattern), func(t *testing.T) {
			head, data := headOf(tt.pattern)
			require.Len(t, head, pagesHeader+container.GroupedDataOffset(len(tt.pattern)))
			got, err := sealedParts(head, data, nil)
			require.NoError(t, err)
			want := make([]int, len(tt.want))
			for i, k := range tt.want {
				want[i] = k * PageSize
			}
			assert.Equal(t, want, got)
		})
	}
	if len(make128(1)) != maxParts {
		t.Fatalf("the most runs: %d, maxParts %d", len(make128(1)), maxParts)
	}

	head, data := headOf("rrzr")
	for _, tt := range []struct {
		name   string
		mutate func(h []byte) []byte
		data   int
	}{
		{"compressed", func(h []byte) []byte { h[0] = byte(codecS2); return h }, data},
		{"pages header's reserved byte", func(h []byte) []byte { h[2] = 1; return h }, data},
		{"section length", func(h []byte) []byte { binary.LittleEndian.PutUint32(h[4:], uint32(len(h))); return h }, data},
		{"interleaved", func(h []byte) []byte { h[pagesHeader+2] = 0; return h }, data},
		{"no entries", func(h []byte) []byte { h[pagesHeader] = 0; return h }, data},
		{"split short of the data", func(h []byte) []byte { return h[:len(h)-1] }, data},
		{"data longer than the entries", func(h []byte) []byte {
			binary.LittleEndian.PutUint32(h[4:], uint32(len(h)-pagesHeader+data+PageSize))
			return h
		}, data + PageSize},
		{"an entry longer than a page's XOR", func(h []byte) []byte {
			binary.LittleEndian.PutUint32(h[pagesHeader+4+12:], 1<<20)
			return h
		}, data},
		{"truncated", func(h []byte) []byte { return h[:pagesHeader+2] }, data},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := tt.mutate(bytes.Clone(head))
			_, err := sealedParts(h, tt.data, nil)
			require.ErrorIs(t, err, ErrFrame)
		})
	}
}

func make128(pages int) []int {
	r := make([]int, 128)
	for i := range r {
		r[i] = pages
	}
	return r
}

// FuzzSealedParts: whatever part 0 says, sealedParts never panics, and
// the parts it returns are at most maxParts, none empty, and cover the
// data exactly.
func FuzzSealedParts(f *testing.F) {
	for _, p := range []string{"r", "rrzr", "zzrzzrrrz", "rzrzrzrz"} {
		h, data := headOf(p)
		f.Add(h, data)
	}
	f.Fuzz(func(t *testing.T, head []byte, data int) {
		parts, err := sealedParts(head, data, nil)
		if err != nil {
			require.ErrorIs(t, err, ErrFrame)
			return
		}
		require.LessOrEqual(t, len(parts), maxParts)
		sum := 0
		for _, k := range parts {
			require.Positive(t, k)
			sum += k
		}
		require.Equal(t, data, sum)
	})
}

// stagedCheckpoint sends a checkpoint of n pages staged back to back, as
// replicate stages them (SendSummedPage), every seventh a zero page, and
// returns the memory the standby must then hold.
func stagedCheckpoint(t *testing.T, s *Sender, epoch uint64, n int) ([]byte, error) {
	want := make([]byte, n*PageSize)
	staging := make([]byte, n*PageSize)
	sums := make([]guestmem.PageSum, n)
	if err := s.BeginCheckpoint(epoch, KindEpoch); err != nil {
		return want, err
	}
	for p := range n {
		pg := make([]byte, PageSize)
		if p%7 != 3 {
			pg = page(epoch*1000 + uint64(p))
		}
		copy(want[p*PageSize:], pg)
		staged := staging[p*PageSize : (p+1)*PageSize]
		guestmem.CopyPageSummed(staged, pg, &sums[p])
		if err := s.SendSummedPage(GPA(p*PageSize), staged, &sums[p]); err != nil {
			return want, err
		}
	}
	if err := s.SendState([]byte("state")); err != nil {
		return want, err
	}
	return want, s.EndCheckpoint()
}

// A keyed Pages frame sealed in parts is as tamper-proof as one sealed
// whole: a byte flipped in its split or part count, in any part's
// ciphertext or tag, or two of its parts of the same length swapped, is
// ErrAuth, and nothing of the checkpoint is committed. Untouched, the
// same frames are acked and the standby holds the pages.
func TestSealedPartsTampered(t *testing.T) {
	const n = 300
	// Frame 3 is the first Pages frame: 256 pages, zero where p%7 == 3,
	// so runs of 3, then 6 pages (parts 1, 2, 3, ...).
	split := pagesHeader + container.GroupedDataOffset(MaxPagesPerFrame)
	part := func(i int) (off, size int) { // part i's place in the frame, tag included
		off = headerSize + split + tagSize
		if i == 0 {
			return headerSize, split + tagSize
		}
		for k := 1; k < i; k++ {
			off += runPages(k)*PageSize + tagSize
		}
		return off, runPages(i)*PageSize + tagSize
	}
	flip := func(at func() int) func([]byte) {
		return func(f []byte) {
			i := at()
			if i < 0 {
				i += len(f)
			}
			f[i] ^= 0x20
		}
	}
	cases := []struct {
		name   string
		mutate func(f []byte) // nil: untouched
	}{
		{"untouched", nil},
		{"split", flip(func() int { return 5 })},
		{"split high byte", flip(func() int { return 6 })},
		{"parts", flip(func() int { return 7 })},
		{"part 0 ciphertext", flip(func() int { o, _ := part(0); return o + pagesHeader + 4 })},
		{"part 0 tag", flip(func() int { o, k := part(0); return o + k - 1 })},
		{"part 1 ciphertext", flip(func() int { o, _ := part(1); return o + 100 })},
		{"part 2 tag", flip(func() int { o, k := part(2); return o + k - tagSize })},
		{"last tag", flip(func() int { return -1 })},
		{"parts 2 and 3 swapped", func(f []byte) {
			o2, k2 := part(2)
			o3, k3 := part(3)
			require.Equal(t, k2, k3)
			p2 := bytes.Clone(f[o2 : o2+k2])
			copy(f[o2:], f[o3:o3+k3])
			copy(f[o3:], p2)
		}},
	}
	for _, c := range []Cipher{CipherAEGISX2, CipherAEGIS, CipherAESGCM} {
		for _, tt := range cases {
			t.Run(c.String()+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				sealedPartsTrial(t, c, tt.mutate, split, n)
			})
		}
	}
}

// sealedPartsTrial is one case of TestSealedPartsTampered: a staged
// checkpoint of n pages under cipher c, its first Pages frame (split
// after split bytes) mutated on the way, or not (mutate nil).
func sealedPartsTrial(t *testing.T, c Cipher, mutate func([]byte), split, n int) {
	var seen []byte
	sc, rc := proxy(t, func(i int, f []byte) [][]byte {
		if i == 3 {
			seen = bytes.Clone(f[:headerSize])
			if mutate != nil {
				mutate(f)
			}
		}
		return [][]byte{f}
	})
	scfg, rcfg := cfgs(newFakeClock())
	scfg.Cipher = c
	mem := &flatMem{b: make([]byte, 4<<20)}
	sink := &StagingSink{Dest: mem}
	rcfg.Sink = sink
	s, serr, r, rerr := connect(t, sc, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	run := runReceiver(t, r)
	want, sendErr := stagedCheckpoint(t, s, 1, n)
	ctx := ctxTimeout(t, 5*time.Second)
	ackErr := s.WaitAck(ctx, 1)
	h, herr := parseHeader(seen)
	require.NoError(t, herr)
	require.Equal(t, framePages, h.typ)
	require.EqualValues(t, split, h.split, "frame 3 sealed in parts, split after the head")
	require.EqualValues(t, runsOf(MaxPagesPerFrame), h.parts)
	require.Equal(t, c.String(), r.Cipher())
	if mutate == nil {
		require.NoError(t, sendErr)
		require.NoError(t, ackErr)
		sink.waitApplied()
		require.True(t, bytes.Equal(want, mem.b[:len(want)]), "standby memory")
		assert.Zero(t, s.slots[0].gathered+s.slots[1].gathered+s.slots[2].gathered, "pages gathered")
		require.NoError(t, s.Close())
		require.NoError(t, waitErr(t, run))
		return
	}
	require.Error(t, ackErr, "tampered checkpoint acknowledged")
	if ctx.Err() != nil {
		s.Close()
	}
	err := waitErr(t, run)
	require.ErrorIs(t, err, ErrAuth)
	assert.Zero(t, r.Committed())
	assert.Zero(t, mem.writes.Load(), "nothing applied")
}

// runPages is the length in pages of data part k (from 1) of the first
// Pages frame of stagedCheckpoint: zero pages where p%7 == 3.
func runPages(k int) int {
	if k == 1 {
		return 3
	}
	return 6
}

// runsOf counts the runs of pages with data among pages 0..n-1 of
// stagedCheckpoint.
func runsOf(n int) int {
	runs := 0
	for p := range n {
		if p%7 != 3 && (p == 0 || (p-1)%7 == 3) {
			runs++
		}
	}
	return runs
}
