package stream

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// SendStablePage in an unkeyed, stored session writes its Pages frames
// from where the pages lie: the standby's memory, the End frame's sum and
// the bytes on the wire are those of the same checkpoints sent with
// SendPage, over TCP (writev) and over a pipe, zero pages among them; with
// the two calls mixed (frames cut at each switch too) memory is the
// checkpoint's all the same; keyed, it is SendPage.
func TestSendStablePage(t *testing.T) {
	for _, tt := range []struct {
		name       string
		keyed, tcp bool
	}{
		{"unkeyed tcp", false, true},
		{"unkeyed pipe", false, false},
		{"keyed tcp", true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			const n = 700
			var sums [3]uint64
			var wire [3]uint64
			for i, mode := range []string{"copy", "stable", "mixed"} {
				scfg, rcfg := cfgs(newFakeClock())
				if !tt.keyed {
					scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
				}
				mem := &flatMem{b: make([]byte, 4<<20)}
				rcfg.Sink = &StagingSink{Dest: mem}
				var s *Sender
				var r *Receiver
				if tt.tcp {
					a, b := tcpPair(t)
					var serr, rerr error
					s, serr, r, rerr = connect(t, a, b, scfg, rcfg)
					require.NoError(t, serr)
					require.NoError(t, rerr)
				} else {
					s, r = pipePair(t, scfg, rcfg)
				}
				run := runReceiver(t, r)
				want := make([]byte, 4<<20)
				for epoch := uint64(1); epoch <= 2; epoch++ {
					require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
					for p := range n {
						pg := page(epoch*1000 + uint64(p))
						if p%5 == 3 || (p >= 256 && p < 300) {
							pg = make([]byte, PageSize) // zero pages, a run of them across a frame's start
						}
						copy(want[p*PageSize:], pg)
						send := s.SendPage
						if mode == "stable" || (mode == "mixed" && (p/100)%2 == 0) { // mixed: switching inside frames
							send = s.SendStablePage
						}
						require.NoError(t, send(GPA(p*PageSize), pg))
					}
					require.NoError(t, s.SendState([]byte("state")))
					require.NoError(t, s.EndCheckpoint())
					require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
					rcfg.Sink.(*StagingSink).waitApplied()
					require.True(t, bytes.Equal(want, mem.b), "memory after checkpoint %d", epoch)
				}
				sums[i], wire[i] = s.cur.sum, s.Stats().BytesSent
				assert.Equal(t, uint64(2*n), r.Stats().Pages)
				require.NoError(t, s.Close())
				require.NoError(t, waitErr(t, run))
			}
			assert.Equal(t, sums[0], sums[1], "the End frame's sum")
			assert.Equal(t, wire[0], wire[1], "bytes on the wire")
		})
	}
}
