package stream

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"

	"govmm/vmm/guestmem"
)

// memWriter is flat guest memory for the benchmark.
type memWriter []byte

func (m memWriter) WriteAt(p []byte, gpa GPA) error {
	copy(m[gpa:], p)
	return nil
}

// benchPair connects a Sender to a Receiver over loopback TCP, keyed
// (AES-256-GCM) or not (CRC32C), the receiver staging into a StagingSink
// over flat memory of npages and running until the benchmark ends.
func benchPair(b *testing.B, npages int, keyed bool) *Sender {
	return benchPairBuf(b, npages, keyed, 0)
}

// benchPairBuf is benchPair with the sender's Config.SendBuffer sndbuf
// (0: SendBufferAuto, the default; SendBufferKernel: the kernel's,
// autotuned; else fixed at that many bytes).
func benchPairBuf(b *testing.B, npages int, keyed bool, sndbuf int) *Sender {
	return benchPairCipher(b, npages, keyed, sndbuf, CipherAuto)
}

// benchPairCipher is benchPairBuf with both ends' Config.Cipher c.
func benchPairCipher(b *testing.B, npages int, keyed bool, sndbuf int, c Cipher) *Sender {
	id := Identity{Name: "bench", Regions: []Region{{GPA: 0, Size: uint64(npages) * PageSize}}, VCPUs: 1}
	quiet := slog.New(slog.DiscardHandler)
	rcfg := Config{Identity: id, Logger: quiet, Sink: &StagingSink{Dest: make(memWriter, npages*PageSize)}, Cipher: c}
	scfg := Config{Identity: id, Logger: quiet, Cipher: c, SendBuffer: sndbuf}
	if keyed {
		rcfg.Key, scfg.Key = testKey, testKey
	} else {
		rcfg.Insecure, scfg.Insecure = true, true
	}
	ln, err := Listen("127.0.0.1:0", rcfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	rch := make(chan *Receiver, 1)
	go func() {
		r, err := ln.Accept(b.Context())
		if err != nil {
			b.Error(err)
		}
		rch <- r
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewSender(b.Context(), conn, scfg)
	if err != nil {
		b.Fatal(err)
	}
	r := <-rch
	b.Cleanup(func() { s.Close(); r.Close() })
	go r.Run(b.Context())
	return s
}

// benchPages is npages distinct non-zero pages, back to back.
func benchPages(npages int) []byte {
	src := make([]byte, npages*PageSize)
	for i := range npages {
		copy(src[i*PageSize:], page(uint64(i)+1))
	}
	return src
}

// benchSums is the PageSum of each of src's pages, as package
// replicate's staging copy takes them (guestmem.CopyPageSummed), or nil
// where this CPU has no fast sum (its staging copy then takes none).
func benchSums(src []byte) []guestmem.PageSum {
	if !guestmem.PageSumFast() {
		return nil
	}
	sums := make([]guestmem.PageSum, len(src)/PageSize)
	scratch := make([]byte, PageSize)
	for i := range sums {
		guestmem.CopyPageSummed(scratch, src[i*PageSize:(i+1)*PageSize], &sums[i])
	}
	return sums
}

// benchCheckpoint sends pages src as checkpoint epoch with 64 KiB of
// state, and waits for its ack. The pages are stable and come with the
// sums their staging copy took (SendSummedPage; benchSums), as package
// replicate's staging buffer does.
func benchCheckpoint(b *testing.B, s *Sender, epoch uint64, kind Kind, src []byte, sums []guestmem.PageSum) {
	if err := s.BeginCheckpoint(epoch, kind); err != nil {
		b.Fatal(err)
	}
	for i := range len(src) / PageSize {
		var ps *guestmem.PageSum
		if sums != nil {
			ps = &sums[i]
		}
		if err := s.SendSummedPage(GPA(i*PageSize), src[i*PageSize:(i+1)*PageSize], ps); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.SendState(make([]byte, 64<<10)); err != nil {
		b.Fatal(err)
	}
	if err := s.EndCheckpoint(); err != nil {
		b.Fatal(err)
	}
	if err := s.WaitAck(b.Context(), epoch); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkCheckpoint measures SendPage → commit → ack over loopback TCP
// for a checkpoint of 64k distinct non-zero pages (256 MiB), keyed, with
// the receiver staging into a StagingSink over flat memory.
func BenchmarkCheckpoint(b *testing.B) {
	const npages = 64 << 10
	for _, kind := range []Kind{KindEpoch, KindInitialSync} {
		b.Run(fmt.Sprintf("%v-64k-pages", kind), func(b *testing.B) {
			s := benchPair(b, npages, true)
			src := benchPages(npages)
			sums := benchSums(src)
			b.SetBytes(npages * PageSize)
			epoch := uint64(0)
			for b.Loop() {
				epoch++
				benchCheckpoint(b, s, epoch, kind, src, sums)
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/checkpoint")
		})
	}
}

// BenchmarkAck is issue 13's time to ack at 1,000, 4,096 and 65,536
// non-zero dirty pages per epoch (no compression), keyed (the session's
// cipher: AEGIS-128L where the CPU runs it) and unkeyed (in clear,
// checked by the End frame's sum), each beside its loopback bound
// measured in the same run: the bytes the checkpoint put on the wire written on a plain
// loopback TCP connection, until a one-byte ack comes back. Compare ms/ack
// with the bound's ms/ack; cpu-ms/ack is the CPU both ends spent per ack
// (the process's user and system time), which a busy host disturbs less.
func BenchmarkAck(b *testing.B) {
	for _, keyed := range []bool{true, false} {
		mode := "keyed"
		if !keyed {
			mode = "unkeyed"
		}
		for _, npages := range []int{1000, 4096, 65536} {
			var wire int
			b.Run(fmt.Sprintf("%s/stream-%d", mode, npages), func(b *testing.B) { wire = benchAckStream(b, npages, keyed, 0, 0) })
			b.Run(fmt.Sprintf("%s/bound-%d", mode, npages), func(b *testing.B) { benchLoopbackBound(b, wire) })
		}
	}
}

// BenchmarkAckCipher is BenchmarkAck's keyed stream under each session
// cipher this CPU runs, and unkeyed, at each size: with -count N the
// ciphers take turns N times, side by side in time, which govmm bench
// ack's modes (one after the other) are not. Compare ms/ack and
// cpu-ms/ack.
func BenchmarkAckCipher(b *testing.B) {
	for _, npages := range []int{1000, 4096, 65536} {
		for _, c := range []Cipher{CipherAEGISX2, CipherAEGIS, CipherAESGCM, CipherAuto} {
			name, keyed := c.String(), c != CipherAuto
			if !keyed {
				name = "unkeyed"
			}
			b.Run(fmt.Sprintf("%d/%s", npages, name), func(b *testing.B) {
				if c.Check() != nil {
					b.Skip(c.Check())
				}
				benchAckCipher(b, npages, keyed, 0, 0, c)
			})
		}
	}
}

// BenchmarkAckSendBuffer is BenchmarkAck's unkeyed points at 1,000 and
// 4,096 pages, back to back and after a 50 ms gap (untimed), the stream
// and its loopback bound each with the kernel's send buffer (autotuned,
// as BenchmarkAck's bound uses it and the stream did before it fixed its
// own on a short link, Config.SendBuffer) and with one fixed at 256 KiB: on this project's 2-core host a sender that never fills its
// send buffer keeps its core while the receiver waits to be scheduled, so
// the bound is not a floor (docs/STREAM.md, "The bound is not a floor").
// Compare ms/ack across the four at each point.
func BenchmarkAckSendBuffer(b *testing.B) {
	for _, npages := range []int{1000, 4096} {
		for _, gap := range []time.Duration{0, 50 * time.Millisecond} {
			for _, sndbuf := range []int{SendBufferKernel, 256 << 10} {
				name := fmt.Sprintf("%d/gap-%v/sndbuf-", npages, gap)
				if sndbuf == SendBufferKernel {
					name += "kernel"
				} else {
					name += fmt.Sprintf("%dk", sndbuf>>10)
				}
				var wire int
				b.Run("stream-"+name, func(b *testing.B) { wire = benchAckStream(b, npages, false, sndbuf, gap) })
				b.Run("bound-"+name, func(b *testing.B) { benchLoopbackBoundBuf(b, wire, max(sndbuf, 0), gap) })
			}
		}
	}
}

// benchAckStream sends checkpoints of npages distinct non-zero pages,
// b.N times after a warm-up, each waiting for its ack (and, when gap is
// not 0, after an untimed pause of gap), the sender's Config.SendBuffer
// sndbuf (benchPairBuf); it reports ms/ack, cpu-ms/ack and
// wireB/page, and returns the wire bytes of a checkpoint.
func benchAckStream(b *testing.B, npages int, keyed bool, sndbuf int, gap time.Duration) (wire int) {
	return benchAckCipher(b, npages, keyed, sndbuf, gap, CipherAuto)
}

// benchAckCipher is benchAckStream with both ends' Config.Cipher c.
func benchAckCipher(b *testing.B, npages int, keyed bool, sndbuf int, gap time.Duration, c Cipher) (wire int) {
	s := benchPairCipher(b, npages, keyed, sndbuf, c)
	src := benchPages(npages)
	sums := benchSums(src)
	epoch := uint64(1)
	benchCheckpoint(b, s, epoch, KindEpoch, src, sums) // warm up
	b.SetBytes(int64(npages) * PageSize)
	cpu := cpuTime()
	b.ResetTimer()
	for range b.N {
		pause(b, gap)
		epoch++
		before := s.Stats().BytesSent
		benchCheckpoint(b, s, epoch, KindEpoch, src, sums)
		wire = int(s.Stats().BytesSent - before)
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/ack")
	b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(b.N)/1000, "cpu-ms/ack")
	b.ReportMetric(float64(wire)/float64(npages), "wireB/page")
	return wire
}

// pause waits gap with the benchmark's timer stopped.
func pause(b *testing.B, gap time.Duration) {
	if gap == 0 {
		return
	}
	b.StopTimer()
	time.Sleep(gap)
	b.StartTimer()
}

// setSendBuffer fixes conn's send buffer at n bytes (SO_SNDBUF, which
// also ends the kernel's autotuning of it); 0 leaves it alone.
func setSendBuffer(b *testing.B, conn net.Conn, n int) {
	if n == 0 {
		return
	}
	if err := conn.(*net.TCPConn).SetWriteBuffer(n); err != nil {
		b.Fatal(err)
	}
}

// benchLoopbackBound writes n bytes on a loopback TCP connection and waits
// for a one-byte ack, b.N times.
func benchLoopbackBound(b *testing.B, n int) { benchLoopbackBoundBuf(b, n, 0, 0) }

// benchLoopbackBoundBuf is benchLoopbackBound with the writer's send
// buffer fixed at sndbuf bytes (0: the kernel's) and, when gap is not 0,
// an untimed pause of gap before each transfer.
func benchLoopbackBoundBuf(b *testing.B, n, sndbuf int, gap time.Duration) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		rx, err := ln.Accept()
		if err != nil {
			return
		}
		defer rx.Close()
		buf := make([]byte, 1<<20)
		var hdr [8]byte
		for {
			if _, err := io.ReadFull(rx, hdr[:]); err != nil {
				return
			}
			for left := int(binary.LittleEndian.Uint64(hdr[:])); left > 0; {
				k, err := rx.Read(buf[:min(left, len(buf))])
				if err != nil {
					return
				}
				left -= k
			}
			if _, err := rx.Write([]byte{1}); err != nil {
				return
			}
		}
	}()
	tx, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer tx.Close()
	setSendBuffer(b, tx, sndbuf)
	src := make([]byte, 8+n)
	binary.LittleEndian.PutUint64(src, uint64(n))
	ack := make([]byte, 1)
	once := func() {
		if _, err := tx.Write(src); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(tx, ack); err != nil {
			b.Fatal(err)
		}
	}
	once() // warms the socket buffers
	b.SetBytes(int64(n))
	cpu := cpuTime()
	b.ResetTimer()
	for range b.N {
		pause(b, gap)
		once()
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/ack")
	b.ReportMetric(float64((cpuTime()-cpu).Microseconds())/float64(b.N)/1000, "cpu-ms/ack")
}

// BenchmarkDeltaPage is a sender's extra work per page with deltas on:
// the XOR with the shadow (counting zero words), the CRC32C of the new
// page and the shadow's update.
func BenchmarkDeltaPage(b *testing.B) {
	p, base, x := page(1), page(2), make([]byte, PageSize)
	b.SetBytes(PageSize)
	for b.Loop() {
		xorPage(x, p, base)
		_ = crc32.Checksum(p, castagnoli)
		copy(base, p)
	}
}

// cpuTime is the process's CPU time so far (user and system, every
// thread): BenchmarkAck reports it per ack beside the wall time, since on
// a busy host (or two cores shared by both ends) the CPU an ack costs is
// what decides how soon it can come.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
