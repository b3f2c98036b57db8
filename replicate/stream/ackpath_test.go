package stream

import (
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// choppyConn hands its reader at most the next of cuts bytes per Read,
// in turn: reads that end inside a 32-byte block of the sum, on its
// edges, and a byte into the next.
type choppyConn struct {
	net.Conn
	cuts []int
	i    int
}

func (c *choppyConn) Read(p []byte) (int, error) {
	n := c.cuts[c.i%len(c.cuts)]
	c.i++
	return c.Conn.Read(p[:min(len(p), n)])
}

// An unkeyed receiver sums a stored Pages frame's section as each read
// brings it in (frameReader.readSummed): over loopback TCP, with reads
// cut at every offset in a block and across blocks, checkpoints of
// references (SendStablePage) and of copies, whose sections end inside a
// block (a zero page's entry has no data), commit with the sender's sum,
// and memory is theirs.
func TestReaderSumsAsItReads(t *testing.T) {
	for _, cuts := range [][]int{
		{1 << 20},
		{1, 31, 32, 33, 64, 4095, 7, 65537},
		{17, 100000, 3, 29},
	} {
		scfg, rcfg := cfgs(newFakeClock())
		scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
		mem := &flatMem{b: make([]byte, 4<<20)}
		rcfg.Sink = &StagingSink{Dest: mem}
		a, b := tcpPair(t)
		s, serr, r, rerr := connect(t, a, &choppyConn{Conn: b, cuts: cuts}, scfg, rcfg)
		require.NoError(t, serr)
		require.NoError(t, rerr)
		run := runReceiver(t, r)
		want := make([]byte, 4<<20)
		for epoch := uint64(1); epoch <= 4; epoch++ {
			n := []int{1, 300, 700, 3}[epoch-1]
			require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
			for p := range n {
				pg := page(epoch*1000 + uint64(p))
				if p%7 == 5 {
					pg = make([]byte, PageSize)
				}
				copy(want[p*PageSize:], pg)
				send := s.SendStablePage
				if epoch%2 == 0 {
					send = s.SendPage
				}
				require.NoError(t, send(GPA(p*PageSize), pg))
			}
			require.NoError(t, s.SendState(bytes.Repeat([]byte("state"), 7)))
			require.NoError(t, s.EndCheckpoint())
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch), "cuts %v, checkpoint %d", cuts, epoch)
			rcfg.Sink.(*StagingSink).waitApplied()
			require.True(t, bytes.Equal(want, mem.b), "cuts %v: memory after checkpoint %d", cuts, epoch)
		}
		require.NoError(t, s.Close())
		require.NoError(t, waitErr(t, run))
	}
}

// A byte changed on the way anywhere in an unkeyed Pages frame's section
// (its entry count, an entry's header, the padding after the headers, a
// page's first block, its last, the section's last byte) fails the
// checkpoint's End: the reader's sum is the one the receiver compares,
// and nothing is acknowledged. The section is grouped (SendStablePage):
// five headers, then the pages from its 128th byte.
func TestReaderSumCatchesEveryByte(t *testing.T) {
	section := headerSize + pagesHeader // where a Pages frame's section starts
	data := section + container.GroupedDataOffset(5)
	for _, tt := range []struct {
		name string
		at   func(n int) int // offset in the frame of n bytes (trailer included)
		// malformed: the change may also make the section malformed or
		// a page misplaced, refused before the End; else ErrChecksum.
		malformed bool
	}{
		{"entry count", func(int) int { return section }, true},
		{"entry header", func(int) int { return section + 6 }, true},
		{"padding", func(int) int { return data - 3 }, true},
		{"first page block", func(int) int { return data + 8 }, false},
		{"in a middle block", func(n int) int { return section + (n-section)/2 + 13 }, false},
		{"last byte", func(n int) int { return n - crcSize - 1 }, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s, r, _ := corruptPagesPair(t, func(f []byte) { f[tt.at(len(f))] ^= 0x40 })
			run := runReceiver(t, r)
			// The sender's calls may meet the receiver's verdict already.
			if s.BeginCheckpoint(1, KindEpoch) == nil {
				for p := range 5 {
					_ = s.SendStablePage(GPA(p*PageSize), page(uint64(p)+1))
				}
				if s.SendState([]byte("state")) == nil {
					_ = s.EndCheckpoint()
				}
			}
			err := waitErr(t, run)
			if tt.malformed {
				require.Error(t, err)
			} else {
				require.ErrorIs(t, err, ErrChecksum)
			}
			assert.Zero(t, r.committed.Load(), "nothing committed")
			require.Error(t, s.WaitAck(ctxTimeout(t, 5*time.Second), 1))
		})
	}
}
