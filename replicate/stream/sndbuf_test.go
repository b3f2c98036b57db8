package stream

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// SendBufferAuto fixes the buffer on a short link only, a positive
// Config.SendBuffer always, SendBufferKernel never.
func TestSendBufferFor(t *testing.T) {
	for _, c := range []struct {
		want int
		rtt  time.Duration
		out  int
	}{
		{SendBufferAuto, 20 * time.Microsecond, ShortLinkSendBuffer},
		{SendBufferAuto, ShortLinkRTT, ShortLinkSendBuffer},
		{SendBufferAuto, ShortLinkRTT + time.Microsecond, 0},
		{SendBufferAuto, 10 * time.Millisecond, 0},
		{SendBufferAuto, 0, 0}, // unknown: the kernel's
		{SendBufferKernel, 20 * time.Microsecond, 0},
		{1 << 20, 10 * time.Millisecond, 1 << 20},
		{64 << 10, 20 * time.Microsecond, 64 << 10},
	} {
		assert.Equal(t, c.out, sendBufferFor(c.want, c.rtt), "want %d, rtt %v", c.want, c.rtt)
	}
	for _, bad := range []int{-2, MaxSendBuffer + 1} {
		scfg, _ := cfgs(SystemClock{})
		scfg.SendBuffer = bad
		_, err := scfg.withDefaults()
		require.ErrorIs(t, err, ErrConfig)
		assert.ErrorContains(t, err, fmt.Sprintf("send buffer %d", bad))
	}
}

// sockSendBuffer reads conn's SO_SNDBUF as the kernel reports it.
func sockSendBuffer(t *testing.T, conn net.Conn) int {
	t.Helper()
	raw, err := conn.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	var v int
	var gerr error
	require.NoError(t, raw.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) }))
	require.NoError(t, gerr)
	return v
}

// Over loopback TCP the sender's socket ends the handshake with the
// send buffer its Config asks for, as the kernel reports it (SO_SNDBUF
// reads back twice the buffer), the handshake's round trip measured;
// and checkpoints still go through it whole, even through one of a few
// kilobytes.
func TestSendBufferOnLoopback(t *testing.T) {
	for _, c := range []struct {
		name string
		want int
	}{{"auto", SendBufferAuto}, {"kernel", SendBufferKernel}, {"fixed 64 KiB", 64 << 10}} {
		t.Run(c.name, func(t *testing.T) {
			scfg, rcfg := cfgs(SystemClock{})
			scfg.SendBuffer = c.want
			sink := NewMemSink()
			rcfg.Sink = sink
			a, b := tcpPair(t)
			before := sockSendBuffer(t, a)
			s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
			require.NoError(t, serr)
			require.NoError(t, rerr)
			rtt := s.RTT()
			t.Logf("round trip %v, send buffer %d", rtt, s.SendBuffer())
			assert.Positive(t, rtt, "the kernel measured the handshake's round trip")
			got := s.SendBuffer()
			assert.Equal(t, got, s.Stats().SendBuffer)
			switch {
			case c.want > 0:
				assert.Equal(t, c.want, got)
			case c.want == SendBufferAuto && rtt <= ShortLinkRTT:
				assert.Equal(t, ShortLinkSendBuffer, got, "loopback, round trip %v", rtt)
			default:
				// The kernel's; on a loopback slower than ShortLinkRTT
				// (a loaded host) auto leaves it too.
				assert.Zero(t, got)
				assert.Equal(t, before, sockSendBuffer(t, a), "left as the kernel set it")
			}
			if got > 0 {
				assert.Equal(t, 2*got, sockSendBuffer(t, a))
			}
			run := runReceiver(t, r)
			for epoch := uint64(1); epoch <= 3; epoch++ {
				require.NoError(t, s.BeginCheckpoint(epoch, KindEpoch))
				for i := range 600 {
					require.NoError(t, s.SendPage(GPA(i*PageSize), page(epoch*1000+uint64(i))))
				}
				require.NoError(t, s.SendState([]byte("state")))
				require.NoError(t, s.EndCheckpoint())
				require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), epoch))
			}
			for i := range 600 {
				require.Equal(t, page(3000+uint64(i)), sink.Page(GPA(i*PageSize)), "page %d", i)
			}
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

func TestParseSendBuffer(t *testing.T) {
	for in, want := range map[string]int{"auto": SendBufferAuto, "kernel": SendBufferKernel, "256K": 256 << 10, "1M": 1 << 20, "65536": 65536} {
		got, err := ParseSendBuffer(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "0", "-1", "256k", "2G", "1025M", "big", "K"} {
		_, err := ParseSendBuffer(bad)
		assert.ErrorContains(t, err, "want auto, kernel, or a size", bad)
	}
}
