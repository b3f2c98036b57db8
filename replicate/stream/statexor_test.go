package stream

import (
	"bytes"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// A checkpoint's state travels as its XOR with the last checkpoint's
// state, compressed, when the session compresses: the receiver commits
// exactly the state sent, through states that grow, shrink, span several
// chunks, and checkpoints without state in between; with most bytes
// unchanged the wire carries a small fraction of them. Without a codec
// the state travels whole, as before version 13.
func TestStateTravelsAsXOR(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	touch := func(b []byte, n int) []byte {
		b = bytes.Clone(b)
		for range n {
			b[rng.IntN(len(b))] ^= 0xff
		}
		return b
	}
	big := random(MaxStateChunk + MaxStateChunk/2) // two chunks
	small := random(18 << 10)                      // a tiny guest's machine state
	states := [][]byte{
		small,
		touch(small, 20),
		append(touch(small, 20), random(4<<10)...), // grown
		touch(small[:10<<10], 5),                   // shrunk
		nil,                                        // no state: the base stays
		touch(small[:10<<10], 5),
		big,
		touch(big, 50), // both chunks against the last state
	}
	for _, keyed := range []bool{true, false} {
		for _, comp := range []Compression{CompressNone, CompressS2, CompressZstd} {
			name := comp.String() + "/unkeyed"
			if keyed {
				name = comp.String() + "/keyed"
			}
			t.Run(name, func(t *testing.T) {
				scfg, rcfg := cfgs(newFakeClock())
				if !keyed {
					scfg.Key, rcfg.Key = nil, nil
					scfg.Insecure, rcfg.Insecure = true, true
				}
				scfg.Compression = comp
				var mu sync.Mutex
				var got [][]byte
				rcfg.OnCommit = func(c *Checkpoint) error {
					mu.Lock()
					got = append(got, bytes.Clone(c.State))
					mu.Unlock()
					return nil
				}
				s, r := pipePair(t, scfg, rcfg)
				run := runReceiver(t, r)
				var wire []uint64
				for i, st := range states {
					e := uint64(i + 1)
					before := s.Stats().BytesSent
					require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
					if st != nil {
						require.NoError(t, s.SendState(st))
					}
					require.NoError(t, s.EndCheckpoint())
					require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), e))
					wire = append(wire, s.Stats().BytesSent-before)
				}
				mu.Lock()
				require.Len(t, got, len(states))
				for i, st := range states {
					require.True(t, bytes.Equal(st, got[i]), "checkpoint %d: committed state differs from the state sent (%d bytes, %d sent)", i+1, len(got[i]), len(st))
				}
				mu.Unlock()
				t.Logf("wire bytes per checkpoint: %v", wire)
				if comp == CompressNone {
					assert.Greater(t, wire[1], uint64(len(states[1])), "stored: the state whole")
				} else {
					assert.Greater(t, wire[0], uint64(len(states[0])), "the first state has nothing to XOR with (random bytes: stored)")
					for _, i := range []int{1, 2, 3, 5, 7} {
						changed := len(states[i]) - len(states[i-1]) // the grown part is new
						if i == 5 {
							changed = 0 // against checkpoint 4's state, across the empty one
						}
						assert.Less(t, wire[i], uint64(max(changed, 0))+2048, "checkpoint %d: %d state bytes, mostly unchanged, took %d on the wire", i+1, len(states[i]), wire[i])
					}
				}
				s.Close()
				require.NoError(t, waitErr(t, run))
			})
		}
	}
}

// Each checkpoint's state reaches OnCommit whole, and the buffer it came
// in serves the next checkpoint's state (Checkpoint.State is the
// callee's only until OnCommit returns): a fresh buffer each time is
// memory the kernel maps page by page at its first write, on the way to
// the ack. A checkpoint without state hands over none.
func TestStateBufferServesTheNextCheckpoint(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	fill := func(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }
	states := [][]byte{fill(64<<10, 1), fill(64<<10, 2), fill(10<<10, 3), nil, fill(64<<10, 4), fill(MaxStateChunk+100, 5)}
	type seen struct {
		state []byte
		at    *byte
	}
	var mu sync.Mutex
	var got []seen
	rcfg.OnCommit = func(c *Checkpoint) error {
		var at *byte
		if len(c.State) > 0 {
			at = &c.State[0]
		}
		mu.Lock()
		got = append(got, seen{bytes.Clone(c.State), at})
		mu.Unlock()
		return nil
	}
	s, r := pipePair(t, scfg, rcfg)
	run := runReceiver(t, r)
	for i, st := range states {
		e := uint64(i + 1)
		require.NoError(t, s.BeginCheckpoint(e, KindEpoch))
		if st != nil {
			require.NoError(t, s.SendState(st))
		}
		require.NoError(t, s.EndCheckpoint())
		require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), e))
	}
	s.Close()
	require.NoError(t, waitErr(t, run))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got, len(states))
	for i, st := range states {
		require.True(t, bytes.Equal(st, got[i].state), "checkpoint %d: the state committed differs from the state sent", i+1)
	}
	assert.Nil(t, got[3].at, "no state, none handed over")
	assert.Same(t, got[0].at, got[1].at, "the second state in the first's buffer")
	assert.Same(t, got[0].at, got[2].at, "a smaller state too")
	assert.Same(t, got[0].at, got[4].at, "after a checkpoint without state too")
	assert.NotNil(t, got[5].at, "a larger state grows the buffer")
}

// A State frame that does not fit the state it is taken against is
// refused: an XOR chunk past the last state's end, and an XOR chunk whose
// bytes are not what the sender meant, which the End frame's sum catches.
func TestStateXORRefused(t *testing.T) {
	xorChunk := func(b []byte) []byte {
		p := stored(b)
		p[1] = stateXOR
		return p
	}
	for _, tt := range []struct {
		name   string
		frames [][]byte
		want   error
	}{
		{"XOR past the last state", [][]byte{stored([]byte("s")), xorChunk([]byte("t"))}, ErrFrame},
		{"XOR against the wrong bytes", [][]byte{xorChunk([]byte{1})}, ErrChecksum},
	} {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 0, []byte("s")))
			require.NoError(t, s.WaitAck(t.Context(), 1))
			require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
			for _, f := range tt.frames {
				forge(t, s, frameState, f)
			}
			if tt.want == ErrChecksum {
				// The sender's sum is of "s" as it sent it: state 's'^1 ≠ 's'.
				s.cur.stateLen = 1
				s.sum.Section(container.TypeState, []byte("s"))
				require.NoError(t, s.EndCheckpoint())
			}
			err := waitErr(t, run)
			require.ErrorIs(t, err, tt.want)
			assert.Equal(t, uint64(1), r.Committed())
		})
	}
}
