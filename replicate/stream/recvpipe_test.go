package stream

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The receiver's reader goroutine reads ahead while Run is busy (here in
// OnCommit of checkpoint 1). A frame it fails to read (a forged tag, a
// cut connection) reaches Run's caller after the frames read before it,
// as Run's error: checkpoint 1 still commits and is acked, checkpoint 2
// is aborted and nothing of it is committed.
func TestReaderFailureReachesRun(t *testing.T) {
	for _, tt := range []struct {
		name string
		bad  func(s *Sender)
		want error
		acks uint64 // a cut connection takes the ack of checkpoint 1 with it
	}{
		{"forged tag", func(s *Sender) {
			var hdr [headerSize]byte
			putHeader(hdr[:], header{length: 100, typ: framePages, seq: s.fw.seq})
			s.wmu.Lock()
			_, _ = s.fw.bw.Write(hdr[:])
			_, _ = s.fw.bw.Write(make([]byte, 100+tagSize))
			_ = s.fw.flush()
			s.wmu.Unlock()
		}, ErrAuth, 1},
		{"connection cut", func(s *Sender) {
			s.wmu.Lock()
			_ = s.fw.flush()
			s.wmu.Unlock()
			_ = s.conn.Close()
		}, ErrTruncated, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			sink := NewMemSink()
			rcfg.Sink = sink
			entered, release := make(chan struct{}), make(chan struct{})
			rcfg.OnCommit = func(c *Checkpoint) error {
				if c.Epoch == 1 {
					close(entered)
					<-release
				}
				return nil
			}
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("s")))
			<-entered
			read := r.Stats().FramesReceived
			require.NoError(t, s.BeginCheckpoint(2, KindEpoch))
			// Over a net.Pipe a write returns once the receiver's reader
			// has taken every byte: Begin 2 and the bad frame are in its
			// hands while Run still waits in OnCommit.
			tt.bad(s)
			require.Eventually(t, func() bool { return r.Stats().FramesReceived == read+1 }, 5*time.Second, 100*time.Microsecond)
			select {
			case err := <-run:
				t.Fatalf("Run returned while in OnCommit: %v", err)
			default:
			}
			assert.Zero(t, r.Committed())
			close(release)
			err := waitErr(t, run)
			require.ErrorIs(t, err, tt.want)
			t.Logf("receiver: %v", err)
			assert.Equal(t, uint64(1), r.Committed(), "checkpoint 1, read before the failure, commits")
			assert.Equal(t, tt.acks, r.Stats().Acks)
			assert.Equal(t, page(1001), sink.Page(PageSize))
			assert.Zero(t, sink.Staged(), "checkpoint 2 aborted")
		})
	}
}

// blockingSink is a MemSink whose first StagePage waits for release.
type blockingSink struct {
	*MemSink
	entered, release chan struct{}
	once             bool
}

func (s *blockingSink) StagePage(gpa GPA, data []byte) error {
	if !s.once {
		s.once = true
		close(s.entered)
		<-s.release
	}
	return s.MemSink.StagePage(gpa, data)
}

// A stream that fails while the reader waits for a slot (all of them
// read ahead, Run busy staging) still ends Run: the reader hands Run the
// failure after the frames it read, instead of leaving Run waiting for a
// frame that never comes. (It once did: a standby whose stream was
// closed between two frames hung in Run for good; TestStopDuringPartition-
// DoesNotHang in replicate caught it under -race.)
func TestReaderStoppedWhileWaitingForASlotEndsRun(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	sink := &blockingSink{MemSink: NewMemSink(), entered: make(chan struct{}), release: make(chan struct{})}
	rcfg.Sink = sink
	s, r := pipePair(t, scfg, rcfg)
	ctx, cancel := context.WithCancel(t.Context())
	run := make(chan error, 1)
	go func() { run <- r.Run(ctx) }()
	read := r.Stats().FramesReceived
	go func() { _ = sendCheckpoint(s, 1, KindEpoch, 3*MaxPagesPerFrame, []byte("s")) }() // blocks once the reader stops
	<-sink.entered
	// Begin, then Pages 1 (Run stages it) and Pages 2 and 3 (read ahead):
	// every slot is out, the reader waits for one.
	require.Eventually(t, func() bool { return r.Stats().FramesReceived == read+4 }, 5*time.Second, 100*time.Microsecond)
	cancel()
	<-r.Done()
	close(sink.release)
	err := waitErr(t, run)
	require.ErrorIs(t, err, ErrClosed)
	assert.Zero(t, r.Committed())
	assert.Zero(t, sink.Staged(), "checkpoint 1 aborted")
}
