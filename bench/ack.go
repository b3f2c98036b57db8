package bench

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"syscall"
	"time"

	"govmm/replicate/stream"
	"govmm/vmm/guestmem"
)

// AckConfig parameterizes the ack suite: issue 13's time to ack against
// the loopback bound of the bytes actually sent, for the stream alone.
type AckConfig struct {
	// Pages are the dirty pages per checkpoint (default 1000, 4096, 65536).
	Pages []int
	// Rounds per point (default 10); each round is one batch of the
	// stream, then one of the bound on the same bytes.
	Rounds int
	// Batch is how long a batch runs at least (default 200ms; at least
	// three checkpoints): CPU time is read per batch, as the process's
	// user and system time, whose ticks are too coarse for one
	// checkpoint of 1,000 pages.
	Batch time.Duration
	// Gaps are the pauses after each ack before the next checkpoint
	// (default 0 and 50ms): back to back, each checkpoint's work meets
	// the last one's leftovers (the standby's copy into memory after its
	// ack); a gap stands for the epoch in which a replicated guest runs
	// between two checkpoints. Only the checkpoints are timed.
	Gaps []time.Duration
	// Split runs the standby's end in a process of its own on a CPU of
	// its own, and this one on another (ack_split.go): two one-core
	// hosts. Govmm is the binary that runs that end.
	Split bool
	// Ciphers are the keyed points' ciphers, each a mode of its own
	// beside the unkeyed one (default: AEGIS-128X2 and AEGIS-128L where
	// the CPU runs them, and AES-256-GCM).
	Ciphers []stream.Cipher
	// SendBuffers are the stream's send buffer policies
	// (stream.Config.SendBuffer), each mode run under each (default:
	// SendBufferAuto alone, the stream's default): SendBufferKernel
	// beside it compares the buffer the stream fixes on a short link
	// with the kernel's, side by side.
	SendBuffers []int
	Govmm       string
	Out         string
	Log         io.Writer
}

// AckSample is one batch: a stream's checkpoints or the bound's
// transfers of the same size, over one connection.
type AckSample struct {
	Keyed bool
	// Cipher is a keyed point's ("aegis-128x2", "aegis-128l" or
	// "aes-256-gcm").
	Cipher string
	// SendBuffer is the stream's send buffer policy, where it is not
	// the default (sendBufferLabel): "" for SendBufferAuto.
	SendBuffer string
	Pages      int
	Kind       string // "stream", "bound", "tuned", (unkeyed) "held" and "applied" or (keyed) "sealed" and "applied" (sealed applied)
	Gap        time.Duration
	Round      int
	Acks       int
	Wall       time.Duration // per ack: the batch's mean
	// Each is every ack's wall time, in order: a batch after gaps holds
	// few acks (four at 50 ms), whose mean one stall of the host (tens of
	// ms, docs/STREAM.md "One ack at a time") decides.
	Each []time.Duration
	CPU  time.Duration // per ack: both ends, user and system
	// StandbyCPU is the standby end's share of CPU (split mode only).
	StandbyCPU time.Duration
	Wire       int // bytes on the wire per checkpoint

	// Seal and Open are, per ack of a keyed stream's batch, the
	// Sender's time sealing frames (stream.Stats.SealTime, on the
	// primary's end) and the Receiver's opening them (OpenTime, on the
	// standby's): the cipher's two passes, which the plain bound does
	// not make. Zero for the bounds' batches and unkeyed.
	Seal, Open time.Duration
}

// AckResult is the ack suite's outcome.
type AckResult struct {
	Config  AckConfig
	Samples []AckSample
	// SendBuffers says, per mode, the send buffer its stream ended its
	// handshake with and the round trip it went by.
	SendBuffers map[string]string
}

// Ack runs checkpoints of cfg.Pages distinct non-zero pages, staged as
// a primary's pause stages them (stagePages), and 64 KiB of state
// (uncompressed, the standby's StagingSink over guest memory)
// from a stream.Sender to a stream.Receiver in this process (or, with
// cfg.Split, in a process of its own on a CPU of its own) over
// loopback TCP, keyed (under each of cfg.Ciphers) and unkeyed, each waiting for its ack
// before the next, and beside each batch the loopback bound: the same
// number of bytes written on a plain loopback TCP connection until a
// one-byte ack comes back; then the same with the writer's send buffer
// fixed (the tuned bound, tunedSendBuffer), keyed the sealed bound and
// the sealed applied bound, unkeyed the held bound (heldBit) and the
// applied bound (appliedBit).
// It is BenchmarkAck (replicate/stream) run as interleaved rounds, so
// that a ratio compares neighbours in time.
func Ack(ctx context.Context, cfg AckConfig) (*AckResult, error) {
	if len(cfg.Pages) == 0 {
		cfg.Pages = []int{1000, 4096, 65536}
	}
	if cfg.Rounds == 0 {
		cfg.Rounds = 10
	}
	if cfg.Batch == 0 {
		cfg.Batch = 200 * time.Millisecond
	}
	if len(cfg.Gaps) == 0 {
		cfg.Gaps = []time.Duration{0, 50 * time.Millisecond}
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if len(cfg.Ciphers) == 0 {
		for _, c := range []stream.Cipher{stream.CipherAEGISX2, stream.CipherAEGIS, stream.CipherAESGCM} {
			if c.Check() == nil {
				cfg.Ciphers = append(cfg.Ciphers, c)
			}
		}
	}
	for _, c := range cfg.Ciphers {
		if c == stream.CipherAuto {
			return nil, fmt.Errorf("ack: keyed points need a cipher, not %v", c)
		}
		if err := c.Check(); err != nil {
			return nil, fmt.Errorf("ack: %v: %w", c, err)
		}
	}
	if len(cfg.SendBuffers) == 0 {
		cfg.SendBuffers = []int{stream.SendBufferAuto}
	}
	res := &AckResult{Config: cfg, SendBuffers: map[string]string{}}
	var modes []ackMode
	for _, b := range cfg.SendBuffers {
		for _, c := range cfg.Ciphers {
			modes = append(modes, ackMode{keyed: true, cipher: c, sendBuffer: b})
		}
		modes = append(modes, ackMode{sendBuffer: b})
	}
	for _, n := range cfg.Pages {
		s, err := ackPoints(ctx, cfg, modes, n, res.SendBuffers)
		res.Samples = append(res.Samples, s...)
		if err != nil {
			return res, err
		}
	}
	return res, res.write(cfg.Out)
}

// ackPoints runs the rounds of every mode at n pages, the modes taking
// turns within each round, so that they are compared side by side in
// time as each is with its bounds: the host's drift over the minutes a
// point takes lands in every mode alike. Every mode's ends are set up
// first and stay up until the last round.
func ackPoints(ctx context.Context, cfg AckConfig, modes []ackMode, n int, sendBuffers map[string]string) ([]AckSample, error) {
	standby := -1 // split: the standby ends' CPU
	if cfg.Split {
		cpu, undo, err := pinSplit()
		if err != nil {
			return nil, err
		}
		defer undo()
		standby = cpu
	}
	var pts []*ackPoint
	defer func() {
		for _, p := range pts {
			p.e.close()
		}
	}()
	for _, m := range modes {
		fmt.Fprintf(cfg.Log, "ack: %v pages=%d\n", m, n)
		p, err := newAckPoint(ctx, cfg, standby, m, n)
		if err != nil {
			return nil, err
		}
		pts = append(pts, p)
		if _, ok := sendBuffers[m.String()]; !ok {
			sendBuffers[m.String()] = fmt.Sprintf("%s (the handshake's round trip %v)", sendBufferName(p.e.s.SendBuffer()), p.e.s.RTT())
		}
	}
	var out []AckSample
	for r := range cfg.Rounds {
		for _, p := range pts {
			s, err := p.round(ctx, cfg, r)
			out = append(out, s...)
			if err != nil {
				return out, err
			}
		}
	}
	return out, nil
}

// ackMode is a point's stream: keyed, sealed with cipher, or unkeyed.
type ackMode struct {
	keyed      bool
	cipher     stream.Cipher // keyed: CipherAEGISX2, CipherAEGIS or CipherAESGCM
	sendBuffer int           // the stream's Config.SendBuffer
}

func (m ackMode) String() string {
	return modeOf(AckSample{Keyed: m.keyed, Cipher: m.cipher.String(), SendBuffer: sendBufferLabel(m.sendBuffer)})
}

// sendBufferLabel names a send buffer policy (stream.Config.SendBuffer)
// in a mode's name: "" for the default, SendBufferAuto.
func sendBufferLabel(b int) string {
	switch {
	case b == stream.SendBufferAuto:
		return ""
	case b == stream.SendBufferKernel:
		return "kernel"
	}
	return fmt.Sprintf("%d KiB", b>>10)
}

// sendBufferName says what send buffer a stream fixed (Sender.SendBuffer).
func sendBufferName(fixed int) string {
	if fixed == 0 {
		return "the kernel's"
	}
	return fmt.Sprintf("fixed at %d KiB", fixed>>10)
}

// key is a fresh key for a point of mode m, nil unkeyed.
func (m ackMode) key() []byte {
	if !m.keyed {
		return nil
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	return key
}

// ackWarmCheckpoints is how many untimed checkpoints warm a point's
// ends (newAckPoint).
const ackWarmCheckpoints = 3

// ackPoint is one mode at one page count, set up and warmed: its ends,
// and each kind's transfer (the stream's checkpoint, the bounds').
type ackPoint struct {
	m   ackMode
	n   int
	e   *ackEnds
	run map[string]func() (int, error)
}

// newAckPoint sets up mode m at n pages: its ends (split: the standby's
// on CPU standby, this process pinned by the caller), then one of each
// transfer to warm them. The caller closes p.e.
func newAckPoint(ctx context.Context, cfg AckConfig, standby int, m ackMode, n int) (p *ackPoint, err error) {
	keyed := m.keyed
	var e *ackEnds
	if cfg.Split {
		e, err = splitEnds(ctx, cfg.Govmm, standby, m, n, cfg.Log)
	} else {
		e, err = localEnds(ctx, m, n)
	}
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	gen := make([]byte, n*guestmem.PageSize)
	for i := range gen {
		gen[i] = byte(i*7 + i>>12) // distinct pages, none zero
	}
	src, sums := stagePages(gen)
	state := make([]byte, 64<<10)
	epoch := uint64(0)
	one := func() (int, error) {
		epoch++
		before := e.s.Stats().BytesSent
		err := ackCheckpoint(ctx, e.s, epoch, src, sums, state)
		return int(e.s.Stats().BytesSent - before), err
	}
	// Warm both ends with ackWarmCheckpoints checkpoints: the standby's
	// StagingSink stages into one set of chunks while it applies from
	// the other, the two swapped at each commit, so that the first two
	// checkpoints of a size each write buffers for the first time (a
	// set each, and the memory applied to), and each such first write
	// is a page fault, which on a host that is itself a VM can cost
	// 13 µs a page (docs/STREAM.md, "A fresh standby's first big
	// checkpoints"): with one warm-up, round 0's second timed ack at
	// 65,536 pages took ~2 s, against ~0.1 s in round 1. The third is
	// a margin.
	var wire int
	for range ackWarmCheckpoints {
		if wire, err = one(); err != nil {
			return nil, err
		}
	}
	buf := make([]byte, 8+wire)
	putLeUint64(buf, uint64(wire))
	ack := make([]byte, 1)
	plain := func(c net.Conn) func() (int, error) { // the bound's transfer on c
		return func() (int, error) {
			if _, err := c.Write(buf); err != nil {
				return 0, err
			}
			_, err := io.ReadFull(c, ack)
			return wire, err
		}
	}
	bound, tuned := plain(e.tx), plain(e.tuned)
	for _, f := range []func() (int, error){bound, tuned} { // warm both
		if _, err := f(); err != nil {
			return nil, err
		}
	}
	run := map[string]func() (int, error){"stream": one, "bound": bound, "tuned": tuned,
		"held":    func() (int, error) { return wire, heldTransfer(e.tx, buf[8:], heldBit) },
		"applied": func() (int, error) { return wire, heldTransfer(e.tx, buf[8:], heldBit|appliedBit) }}
	first := "held" // the bound warmed before the applied one: keyed, the sealed bound
	if keyed {
		aead, err := stream.NewAEAD(m.cipher, e.key)
		if err != nil {
			return nil, err
		}
		if got := e.s.Cipher(); got != m.cipher.String() {
			// The bound must seal as the stream it is the bound of.
			return nil, fmt.Errorf("the stream seals with %s, the sealed bound with %v", got, m.cipher)
		}
		var nonce sealNonce
		var out []byte
		run["sealed"] = func() (int, error) {
			return wire, sealTransfer(e.tx, aead, &nonce, buf[8:], &out, 0)
		}
		run["applied"] = func() (int, error) {
			return wire, sealTransfer(e.tx, aead, &nonce, buf[8:], &out, heldBit|appliedBit)
		}
		first = "sealed"
	}
	for _, kind := range []string{first, "applied", "applied"} { // the reader's buffers and memory grow to the checkpoint's size here
		if _, err := run[kind](); err != nil {
			return nil, err
		}
	}
	return &ackPoint{m: m, n: n, e: e, run: run}, nil
}

// round runs round r of p: at each gap, a batch of each kind, the
// stream's first.
func (p *ackPoint) round(ctx context.Context, cfg AckConfig, r int) ([]AckSample, error) {
	keyed := p.m.keyed
	var out []AckSample
	for _, gap := range cfg.Gaps {
		for _, kind := range ackKinds(keyed) {
			smp, err := ackBatch(ctx, cfg.Batch, gap, p.run[kind], p.e.meter)
			if err != nil {
				return out, fmt.Errorf("ack %s %v pages=%d: %w", kind, p.m, p.n, err)
			}
			if kind != "stream" || !keyed {
				smp.Seal, smp.Open = 0, 0 // the heartbeats' few bytes
			}
			smp.Keyed, smp.Pages, smp.Kind, smp.Gap, smp.Round = keyed, p.n, kind, gap, r
			if keyed {
				smp.Cipher = p.m.cipher.String()
			}
			smp.SendBuffer = sendBufferLabel(p.m.sendBuffer)
			out = append(out, smp)
		}
	}
	return out, nil
}

// ackKinds are a point's batches in each round: the stream's, the
// bound's, the tuned bound's, and keyed the sealed bound's and the sealed
// applied bound's (named "applied"), unkeyed the held bound's and the
// applied bound's.
func ackKinds(keyed bool) []string {
	if keyed {
		return []string{"stream", "bound", "tuned", "sealed", "applied"}
	}
	return []string{"stream", "bound", "tuned", "held", "applied"}
}

// tunedSendBuffer is the tuned bound's send buffer (SO_SNDBUF, which
// Linux doubles for its bookkeeping and no longer autotunes): the bound
// with the kernel's own buffer (autotuned, as the stream uses it) is not
// a floor. In one process on this project's 2-core host the same bytes
// went 1.3-2.3× as fast with 256 KiB, at about half the CPU back to
// back (with --split, as fast as with the kernel's): a writer that never
// fills its buffer keeps its core while the reader waits to be
// scheduled, and what it wrote has left the cache by the time the reader
// copies it (BenchmarkAckSendBuffer, docs/STREAM.md "The bound is not a
// floor").
const tunedSendBuffer = 256 << 10

// ackBatch runs f, then waits gap, until d has passed (at least three
// times), and returns the wall time per run (f alone; and each run's),
// the CPU time per run (gaps included: what the checkpoint left running
// counts; meter says both ends' so far, and the standby end's where it
// is a process of its own), the stream's time sealing and opening per
// run, and the wire bytes of the last.
func ackBatch(ctx context.Context, d, gap time.Duration, f func() (int, error), meter func() (ackMeter, error)) (AckSample, error) {
	var smp AckSample
	var wall time.Duration
	m0, err := meter()
	if err != nil {
		return smp, err
	}
	t0 := time.Now()
	for smp.Acks < 3 || time.Since(t0) < d {
		t := time.Now()
		w, err := f()
		if err != nil {
			return smp, err
		}
		took := time.Since(t)
		wall += took
		smp.Each = append(smp.Each, took)
		smp.Acks++
		smp.Wire = w
		if gap > 0 {
			select {
			case <-time.After(gap):
			case <-ctx.Done():
				return smp, ctx.Err()
			}
		}
	}
	m1, err := meter()
	if err != nil {
		return smp, err
	}
	n := time.Duration(smp.Acks)
	smp.Wall = wall / n
	smp.CPU = (m1.cpu - m0.cpu) / n
	smp.StandbyCPU = (m1.standbyCPU - m0.standbyCPU) / n
	smp.Seal, smp.Open = (m1.seal-m0.seal)/n, (m1.open-m0.open)/n
	return smp, nil
}

// ackMeter is what a point's ends have spent so far: both ends' CPU
// time, the standby end's (split; 0 in one process), and the stream's
// time sealing (its Sender) and opening (its Receiver).
type ackMeter struct{ cpu, standbyCPU, seal, open time.Duration }

// ackEnds are a point's two ends: the Sender and the bound's writer here,
// their peers in this process (localEnds) or in a process of its own
// (splitEnds); meter says what they have spent so far (ackMeter).
type ackEnds struct {
	s     *stream.Sender
	key   []byte   // the point's key (nil: unkeyed), also the sealed bound's
	tx    net.Conn // the bound's writer (and the sealed bound's)
	tuned net.Conn // the tuned bound's writer (tunedSendBuffer)
	meter func() (ackMeter, error)
	close func()
}

// localEnds are both ends in this process over loopback TCP.
func localEnds(ctx context.Context, m ackMode, n int) (*ackEnds, error) {
	key := m.key()
	s, r, closePair, err := ackPair(ctx, key, m.cipher, m.sendBuffer, n)
	if err != nil {
		return nil, err
	}
	tx, rx, err := loopbackPair(ctx)
	if err != nil {
		closePair()
		return nil, err
	}
	ttx, trx, err := loopbackPair(ctx)
	if err != nil {
		tx.Close()
		rx.Close()
		closePair()
		return nil, err
	}
	closeAll := func() { tx.Close(); rx.Close(); ttx.Close(); trx.Close(); closePair() }
	if err := ttx.(*net.TCPConn).SetWriteBuffer(tunedSendBuffer); err != nil {
		closeAll()
		return nil, err
	}
	aead, err := aeadOrNil(key, m.cipher)
	if err != nil {
		closeAll()
		return nil, err
	}
	go ackEach(rx, aead)
	go ackEach(trx, aead)
	return &ackEnds{s: s, key: key, tx: tx, tuned: ttx,
		meter: func() (ackMeter, error) {
			return ackMeter{cpu: cpuNow(), seal: s.Stats().SealTime, open: r.Stats().OpenTime}, nil
		},
		close: closeAll,
	}, nil
}

// ackConfigs are the two ends' stream configurations for n pages, keyed
// with key and sealed with c (key nil: unkeyed, in clear); the
// receiver's Sink is the standby end's to set (ackStandbySink).
func ackConfigs(n int, key []byte, c stream.Cipher, sendBuffer int) (rcfg, scfg stream.Config) {
	id := stream.Identity{Name: "bench-ack", Regions: []stream.Region{{GPA: 0, Size: uint64(n) * guestmem.PageSize}}, VCPUs: 1}
	quiet := slog.New(slog.DiscardHandler)
	// The suite times throughput, not liveness: a long failover timeout,
	// so that a stall of the standby end between batches does not end
	// the stream. One did, on 2026-12-05, at every 65,536-page point
	// split: the standby end's bound reader growing its held buffers to
	// the checkpoint's size (the warm-up, untimed) first-touched 268 MB,
	// ~17 µs a page on this host that day, and the end's one CPU sent no
	// heartbeat for 1.9 s.
	rcfg = stream.Config{Identity: id, Logger: quiet, Compression: stream.CompressNone, FailoverTimeout: ackFailoverTimeout}
	scfg = stream.Config{Identity: id, Logger: quiet, Compression: stream.CompressNone, FailoverTimeout: ackFailoverTimeout, SendBuffer: sendBuffer}
	if key != nil {
		rcfg.Key, scfg.Key = key, key
		rcfg.Cipher, scfg.Cipher = c, c
	} else {
		rcfg.Insecure, scfg.Insecure = true, true
	}
	return rcfg, scfg
}

// ackStandbySink is the standby end's sink for n pages: a StagingSink
// over guest memory mapped as a standby's (guestmem), so that the copy
// into it takes a standby's path. done unmaps the memory; call it only
// once nothing writes it (the Receiver's Run has returned).
func ackStandbySink(n int) (sink *stream.StagingSink, done func(), err error) {
	mem, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: uint64(n) * guestmem.PageSize}})
	if err != nil {
		return nil, nil, err
	}
	return &stream.StagingSink{Dest: mem}, func() { _ = mem.Close() }, nil
}

// ackFailoverTimeout is both ends' failover timeout in the ack suite
// (ackConfigs).
const ackFailoverTimeout = 10 * time.Second

// aeadOrNil is stream.NewAEAD under key, or nil without one.
func aeadOrNil(key []byte, c stream.Cipher) (cipher.AEAD, error) {
	if key == nil {
		return nil, nil
	}
	return stream.NewAEAD(c, key)
}

// ackPair is a Sender connected to a running Receiver over loopback TCP,
// keyed with key (nil: unkeyed), with the layout of n pages and the
// standby end's sink (ackStandbySink).
func ackPair(ctx context.Context, key []byte, c stream.Cipher, sendBuffer, n int) (*stream.Sender, *stream.Receiver, func(), error) {
	rcfg, scfg := ackConfigs(n, key, c, sendBuffer)
	sink, unmap, err := ackStandbySink(n)
	if err != nil {
		return nil, nil, nil, err
	}
	rcfg.Sink = sink
	ln, err := stream.Listen("127.0.0.1:0", rcfg)
	if err != nil {
		unmap()
		return nil, nil, nil, err
	}
	type accepted struct {
		r   *stream.Receiver
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		r, err := ln.Accept(ctx)
		ch <- accepted{r, err}
	}()
	s, err := stream.Dial(ctx, ln.Addr().String(), scfg)
	if err != nil {
		ln.Close()
		unmap() // no Receiver runs: nothing writes the memory
		return nil, nil, nil, err
	}
	a := <-ch
	ln.Close()
	if a.err != nil {
		s.Close()
		unmap()
		return nil, nil, nil, a.err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = a.r.Run(ctx)
	}()
	return s, a.r, func() { s.Close(); a.r.Close(); <-done; unmap() }, nil
}

// stagePages copies pages into a staging buffer as package replicate's
// pause does (Replicator.stage), summing each page as it copies it where
// guestmem.PageSumFast() (sums nil where not): the pages a checkpoint
// sends, and what the stream learns of them from their copy.
func stagePages(pages []byte) (staged []byte, sums []guestmem.PageSum) {
	staged = make([]byte, len(pages))
	if !guestmem.PageSumFast() {
		copy(staged, pages)
		return staged, nil
	}
	sums = make([]guestmem.PageSum, len(pages)/guestmem.PageSize)
	for i := range sums {
		at := i * guestmem.PageSize
		guestmem.CopyPageSummed(staged[at:at+guestmem.PageSize], pages[at:at+guestmem.PageSize], &sums[i])
	}
	return staged, sums
}

// ackCheckpoint sends src's pages and state as checkpoint epoch and
// waits for its ack. Its pages are stable, as replicate's staging
// buffer is (SendStablePage), and come with their sums where sums is
// not nil, as replicate's do (SendSummedPage).
func ackCheckpoint(ctx context.Context, s *stream.Sender, epoch uint64, src []byte, sums []guestmem.PageSum, state []byte) error {
	if err := s.BeginCheckpoint(epoch, stream.KindEpoch); err != nil {
		return err
	}
	for i := range len(src) / guestmem.PageSize {
		gpa, page := guestmem.GPA(i*guestmem.PageSize), src[i*guestmem.PageSize:(i+1)*guestmem.PageSize]
		var ps *guestmem.PageSum
		if sums != nil {
			ps = &sums[i]
		}
		if err := s.SendSummedPage(gpa, page, ps); err != nil {
			return err
		}
	}
	if err := s.SendState(state); err != nil {
		return err
	}
	if err := s.EndCheckpoint(); err != nil {
		return err
	}
	return s.WaitAck(ctx, epoch)
}

// cpuNow is this process's CPU time so far, user and system, all threads.
func cpuNow() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
