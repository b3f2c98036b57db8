package stream

import (
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestConnectionResetIsTruncation(t *testing.T) {
	err := truncated("frame header", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)})
	require.ErrorIs(t, err, ErrTruncated)
	require.NotErrorIs(t, truncated("frame header", net.ErrClosed), ErrTruncated, "a local close is not the peer dying")
}

// resetOnWrite is a connection whose writes fail as a reset connection's
// do once armed: the peer's process died with our data unread.
type resetOnWrite struct {
	net.Conn
	armed atomic.Bool
}

func (c *resetOnWrite) Write(p []byte) (int, error) {
	if c.armed.Load() {
		return 0, &net.OpError{Op: "write", Net: "tcp", Err: os.NewSyscallError("write", syscall.ECONNRESET)}
	}
	return c.Conn.Write(p)
}

// A standby whose ack hits a connection reset by the dying primary ends
// the stream as truncated, as if it had read the end first: that is what
// its failover decision acts on ("connection reset by peer" on the ack
// write once made a standby refuse to take over from a SIGKILLed primary).
func TestResetOnAckIsTruncation(t *testing.T) {
	scfg, rcfg := cfgs(newFakeClock())
	a, b := net.Pipe()
	rc := &resetOnWrite{Conn: b}
	s, serr, r, rerr := connect(t, a, rc, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	rc.armed.Store(true)
	done := runReceiver(t, r)
	require.NoError(t, sendCheckpoint(s, 1, KindEpoch, 3, []byte("state")))
	err := waitErr(t, done)
	require.ErrorIs(t, err, ErrTruncated)
	require.ErrorContains(t, err, "send ack")
	require.Equal(t, uint64(1), r.Committed(), "the checkpoint committed before its ack")
}
