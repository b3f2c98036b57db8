package stream

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Inside a checkpoint a reader polls a drained connection before it
// sleeps: every byte still arrives, in order, and the end of the stream
// is still io.EOF. Bursts that follow each other closely are read while
// it polls (hits); a pause longer than the spin sends it to sleep
// (misses), and it is woken by the next burst as without polling.
func TestPolledReadsDeliverEveryByte(t *testing.T) {
	a, b := tcpPair(t)
	defer b.Close()
	e := &endpoint{cfg: Config{Clock: SystemClock{}}}
	cr := &countingReader{r: b, e: e}
	const spin = 50 * time.Millisecond
	cr.enable(b, spin)
	cr.frame(frameBegin)
	require.True(t, cr.polling, "a TCP connection is polled inside a checkpoint")

	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i*131 + i>>10)
	}
	go func() {
		defer a.Close()
		rest := want
		for i := 0; len(rest) > 0; i++ {
			n := min(len(rest), 1+(i*7919)%(32<<10))
			if _, err := a.Write(rest[:n]); err != nil {
				return
			}
			rest = rest[n:]
			pause := time.Millisecond // well within the spin: read while polling
			if i%20 == 19 {
				pause = 3 * spin // outlasts it: the reader sleeps
			}
			time.Sleep(pause)
		}
	}()
	got, err := io.ReadAll(cr)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "read %d bytes, want the %d written, in order", len(got), len(want))
	st := e.ctr.snapshot()
	assert.NotZero(t, st.PollHits, "bursts 1 ms apart reach a reader polling for 50 ms")
	assert.NotZero(t, st.PollMisses, "a pause of three spins outlasts the spin")
}

// The reader polls only between a checkpoint's Begin and its End: while
// the sender is idle between checkpoints it sleeps at once, its
// heartbeats notwithstanding. A negative ReadSpin never polls, and a
// spin beyond 10 ms is refused.
func TestReceiverPollsOnlyInsideACheckpoint(t *testing.T) {
	for _, spin := range []time.Duration{0, -1} {
		t.Run(map[bool]string{true: "default", false: "never"}[spin == 0], func(t *testing.T) {
			scfg, rcfg := cfgs(SystemClock{})
			scfg.HeartbeatInterval, rcfg.HeartbeatInterval = 5*time.Millisecond, 5*time.Millisecond
			rcfg.ReadSpin = spin
			s, r := tcpStreamPair(t, scfg, rcfg)
			run := runReceiver(t, r)
			for epoch := uint64(1); epoch <= 10; epoch++ {
				// A pause inside the checkpoint, after a full Pages frame
				// went out: the reader drains it and polls for the rest.
				require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
				for i := range 600 {
					if i == 300 {
						time.Sleep(3 * time.Millisecond)
					}
					require.NoError(t, s.SendPage(GPA(i*PageSize), page(epoch*1000+uint64(i))))
				}
				require.NoError(t, s.SendState([]byte("state")))
				require.NoError(t, s.EndCheckpoint())
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
			}
			st := r.Stats()
			polls := st.PollHits + st.PollMisses
			if spin < 0 {
				assert.Zero(t, polls, "ReadSpin < 0 never polls")
			} else {
				assert.NotZero(t, polls, "10 checkpoints, each with a pause after its first Pages frame: the reader drained the connection inside one")
			}
			// Idle: heartbeats only, for 20 of their intervals.
			assertNoPollWhileIdle(t, r.Stats, 10, "between checkpoints the reader sleeps at once")
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
	_, rcfg := cfgs(SystemClock{})
	rcfg.ReadSpin = 11 * time.Millisecond
	_, err := rcfg.withDefaults()
	require.ErrorIs(t, err, ErrConfig)
	assert.ErrorContains(t, err, "read spin 11ms, at most 10ms")
}

// A sender's ack reader, asleep since the last ack, is woken when an End
// goes out and polls for that checkpoint's ack (Config.AckSpin): acks
// that come within the spin are read while it polls (hits, which only a
// reader woken by the End can score: it went to sleep with no ack
// awaited), a slower one after it slept (misses), and once most acks
// come later than the spin only one End in ackProbeEvery polls; every ack arrives and
// the wake-up call is never taken for a failure, checkpoints waited for
// one by one or sent back to back. Between checkpoints the reader sleeps
// at once; AckSpin 0 (the default) never polls, and a spin beyond 10 ms
// is refused.
func TestSenderPollsForItsAck(t *testing.T) {
	for _, tc := range []struct {
		name      string
		spin      time.Duration
		ackAfter  time.Duration // the receiver's OnCommit sleeps this long
		hits, any bool          // expect poll hits; expect any poll at all
	}{
		{"within the spin", 10 * time.Millisecond, time.Millisecond, true, true},
		{"beyond the spin", 200 * time.Microsecond, 20 * time.Millisecond, false, true},
		{"never", 0, time.Millisecond, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			scfg, rcfg := cfgs(SystemClock{})
			// Heartbeats rare enough that none wakes the reader between
			// an ack and the next End, one by one.
			scfg.HeartbeatInterval, rcfg.HeartbeatInterval = 100*time.Millisecond, 100*time.Millisecond
			scfg.FailoverTimeout, rcfg.FailoverTimeout = 5*time.Second, 5*time.Second
			scfg.AckSpin = tc.spin
			rcfg.OnCommit = func(*Checkpoint) error { time.Sleep(tc.ackAfter); return nil }
			s, r := tcpStreamPair(t, scfg, rcfg)
			run := runReceiver(t, r)
			epoch := uint64(0)
			checkpoint := func() {
				epoch++
				require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
				for i := range 20 {
					require.NoError(t, s.SendPage(GPA(i*PageSize), page(epoch*1000+uint64(i))))
				}
				require.NoError(t, s.SendState([]byte("state")))
				require.NoError(t, s.EndCheckpoint())
			}
			for range 15 { // one by one, the reader asleep at each End
				checkpoint()
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
				time.Sleep(2 * time.Millisecond)
			}
			st1 := s.Stats()
			if tc.hits {
				assert.NotZero(t, st1.PollHits, "acks %v after the End reach a reader woken by it and polling for %v", tc.ackAfter, tc.spin)
			}
			for range 10 { // back to back: acks awaited while Ends go out
				checkpoint()
			}
			require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
			require.NoError(t, s.Err(), "a wake-up call is not a failure")
			st := s.Stats()
			assert.Equal(t, uint64(25), st.Acks)
			polls := st.PollHits + st.PollMisses
			switch {
			case !tc.any:
				assert.Zero(t, polls, "AckSpin 0 (the default) never polls")
			case tc.hits: // above
			default:
				assert.NotZero(t, st.PollMisses, "acks %v after the End outlast a spin of %v", tc.ackAfter, tc.spin)
				// After 15 misses one by one (11 take the average of hits
				// below a quarter), at most one of the ten Ends back to
				// back polls (a read or two); polling at every End would
				// miss at least once per End.
				assert.Less(t, polls-(st1.PollHits+st1.PollMisses), uint64(5),
					"acks later than the spin: after 15 misses only one End in %d polls", ackProbeEvery)
			}
			// Idle, no ack awaited: heartbeats only, for 3 of their
			// intervals.
			assertNoPollWhileIdle(t, s.Stats, 3, "with no ack awaited the reader sleeps at once")
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
	scfg, _ := cfgs(SystemClock{})
	scfg.AckSpin = 11 * time.Millisecond
	_, err := scfg.withDefaults()
	require.ErrorIs(t, err, ErrConfig)
	assert.ErrorContains(t, err, "ack spin 11ms, at most 10ms")
}

// assertNoPollWhileIdle waits, an end idle, for beats more frames from its
// peer (heartbeats) and checks that its reader polled for none of them.
func assertNoPollWhileIdle(t *testing.T, stats func() Stats, beats uint64, msg string) {
	t.Helper()
	st := stats()
	require.Eventually(t, func() bool { return stats().FramesReceived >= st.FramesReceived+beats }, 10*time.Second, time.Millisecond)
	st2 := stats()
	assert.Equal(t, st.PollHits+st.PollMisses, st2.PollHits+st2.PollMisses, msg)
}
