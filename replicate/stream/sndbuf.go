package stream

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// A sender's send buffer (Config.SendBuffer).
//
// With the kernel's autotuned send buffer, which grows to megabytes, a
// sender writing a big checkpoint on a short link never blocks: it runs
// megabytes ahead of the standby's reader, and what the reader copies
// has left the caches by then, on both ends of a loopback connection.
// With the buffer fixed at a few hundred kilobytes the sender blocks
// within them, the reader runs, and what it copies is, as far as we
// saw, still in cache: on this project's host, two processes each on a
// core of its own (`govmm bench --split --send-buffers auto,kernel
// ack`, its modes taking turns), checkpoints were acked in 0.91× the
// time with a buffer fixed at 256 KiB as with the autotuned one (the
// median over 24 sizes and modes, 0.81-1.06×), and the loopback bound
// moved its bytes in 0.76-0.84× the time. On a host with another CPU,
// where the fixed buffer did not speed up the bound, the stream gained
// nothing and lost nothing measurable (1.03×, within the rounds'
// spread); 0.93× over the four runs (docs/STREAM.md, "A short link's
// send buffer").
//
// A fixed buffer also caps the connection at about twice its size per
// round trip (the kernel doubles SO_SNDBUF for its bookkeeping), which
// on a long link starves it: 512 KiB in a 10 ms round trip is 50 MB/s.
// So by default a sender fixes it only where the handshake's shortest
// round trip was at most ShortLinkRTT: the same host, or a LAN fast
// enough that 512 KiB per round trip is still over 5 GB/s.
const (
	// SendBufferAuto is Config.SendBuffer's default: fixed at
	// ShortLinkSendBuffer on a short link, the kernel's elsewhere.
	SendBufferAuto = 0
	// SendBufferKernel leaves the send buffer to the kernel's
	// autotuning.
	SendBufferKernel = -1
	// ShortLinkSendBuffer is the send buffer SendBufferAuto fixes on a
	// short link (the bench's tuned bound's, measured there).
	ShortLinkSendBuffer = 256 << 10
	// ShortLinkRTT is the longest round trip SendBufferAuto calls
	// short.
	ShortLinkRTT = 100 * time.Microsecond
	// MaxSendBuffer caps a fixed Config.SendBuffer.
	MaxSendBuffer = 1 << 30
)

// sendBufferFor is what a sender whose policy is want fixes its send
// buffer at, given the link's shortest round trip so far (rtt, 0 when
// unknown): 0 leaves it to the kernel.
func sendBufferFor(want int, rtt time.Duration) int {
	switch {
	case want > 0:
		return want
	case want == SendBufferAuto && rtt > 0 && rtt <= ShortLinkRTT:
		return ShortLinkSendBuffer
	}
	return 0
}

// tuneSendBuffer applies want (Config.SendBuffer) to conn once the
// handshake has measured its round trip. It returns the send buffer it
// fixed, as the kernel took it (half what SO_SNDBUF reads back: the
// kernel doubles the request for its bookkeeping, and caps it at
// net.core.wmem_max), 0 where it left the kernel's; and the round trip
// it went by, 0 where conn is not a TCP socket, which it leaves alone.
// An error leaves the kernel's buffer: the stream works either way.
func tuneSendBuffer(conn net.Conn, want int) (fixed int, rtt time.Duration) {
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return 0, 0
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return 0, 0
	}
	_ = raw.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			rtt = time.Duration(info.Min_rtt) * time.Microsecond
		}
	})
	n := sendBufferFor(want, rtt)
	if n == 0 || tc.SetWriteBuffer(n) != nil {
		return 0, rtt
	}
	_ = raw.Control(func(fd uintptr) {
		if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF); err == nil {
			fixed = v / 2
		}
	})
	return fixed, rtt
}

// sendBufferName says what a sender's send buffer is, for its log.
func sendBufferName(fixed int) string {
	if fixed == 0 {
		return "kernel's"
	}
	return fmt.Sprintf("%d KiB", fixed>>10)
}

// SendBuffer is the send buffer the handshake fixed (Config.SendBuffer),
// in bytes: 0 when it is the kernel's, autotuned.
func (s *Sender) SendBuffer() int { return s.endpoint.sendBuffer }

// RTT is the handshake's shortest round trip, as the kernel measured it
// (0 when unknown, or conn is not a TCP socket): what SendBufferAuto
// went by.
func (s *Sender) RTT() time.Duration { return s.endpoint.rtt }

// ParseSendBuffer reads a send buffer policy as a user gives it: "auto"
// (SendBufferAuto), "kernel" (SendBufferKernel), or a size in bytes with
// an optional K or M suffix (KiB, MiB): "256K".
func ParseSendBuffer(s string) (int, error) {
	switch s {
	case "auto":
		return SendBufferAuto, nil
	case "kernel":
		return SendBufferKernel, nil
	}
	num, unit := s, 1
	switch {
	case strings.HasSuffix(s, "K"):
		num, unit = s[:len(s)-1], 1<<10
	case strings.HasSuffix(s, "M"):
		num, unit = s[:len(s)-1], 1<<20
	}
	n, err := strconv.Atoi(num)
	if err != nil || n <= 0 || n > MaxSendBuffer/unit {
		return 0, fmt.Errorf("send buffer %q: want auto, kernel, or a size from 1 byte to %d MiB (256K, 1M)", s, MaxSendBuffer>>20)
	}
	return n * unit, nil
}
