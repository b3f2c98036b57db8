package stream

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

var testKey = []byte("0123456789abcdef0123456789abcdef")

func testIdentity() Identity {
	return Identity{
		Name:    "vm0",
		Regions: []Region{{GPA: 0, Size: 4 << 20}, {GPA: 1 << 32, Size: 1 << 20}},
		VCPUs:   2,
		Devices: []Device{
			{ID: "uart0", Attrs: []Attr{{"kind", "uart"}}},
			{ID: "virtio-net0", Attrs: []Attr{{"kind", "virtio-net"}, {"mac", "52:54:00:12:34:56"}, {"backend", "tap"}}},
			{ID: "virtio-blk0", Attrs: []Attr{{"kind", "virtio-blk"}, {"size", "1048576"}, {"ro", "false"}}},
		},
	}
}

// fakeClock is a Clock that moves only when told.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	tickers []*fakeTicker
}

type fakeTicker struct {
	c       chan time.Time
	d       time.Duration
	next    time.Time
	stopped atomic.Bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) NewTicker(d time.Duration) Ticker {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTicker{c: make(chan time.Time, 1), d: d, next: c.now.Add(d)}
	c.tickers = append(c.tickers, t)
	return t
}

func (t *fakeTicker) C() <-chan time.Time { return t.c }
func (t *fakeTicker) Stop()               { t.stopped.Store(true) }

// waitTickers waits until n tickers exist, so that Advance reaches them.
func (c *fakeClock) waitTickers(t *testing.T, n int) {
	t.Helper()
	require.Eventually(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.tickers) >= n
	}, 5*time.Second, time.Millisecond)
}

// Step advances the clock n times by d, each time waiting until every
// ticker's tick has been taken, so that a detector sees each one (a real
// ticker running on time).
func (c *fakeClock) Step(t *testing.T, d time.Duration, n int) {
	t.Helper()
	for range n {
		c.Advance(d)
		require.Eventually(t, func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			for _, tk := range c.tickers {
				if !tk.stopped.Load() && len(tk.c) > 0 {
					return false
				}
			}
			return true
		}, 5*time.Second, 100*time.Microsecond)
	}
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	for _, t := range c.tickers {
		for !t.stopped.Load() && !t.next.After(c.now) {
			select {
			case t.c <- c.now:
			default:
			}
			t.next = t.next.Add(t.d)
		}
	}
}

// cfgs returns a keyed sender and receiver config pair on one fake clock
// (so that no heartbeat fires unless a test advances it).
func cfgs(clock Clock) (Config, Config) {
	quiet := slog.New(slog.DiscardHandler)
	s := Config{Key: testKey, Identity: testIdentity(), Clock: clock, HandshakeTimeout: 5 * time.Second, Logger: quiet}
	r := Config{Key: testKey, Identity: testIdentity(), Clock: clock, HandshakeTimeout: 5 * time.Second, Logger: quiet}
	return s, r
}

// connect runs both handshakes over conns and returns both results.
func connect(t *testing.T, sc, rc net.Conn, scfg, rcfg Config) (*Sender, error, *Receiver, error) {
	t.Helper()
	var (
		r    *Receiver
		rerr error
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		r, rerr = NewReceiver(t.Context(), rc, rcfg)
	}()
	s, serr := NewSender(t.Context(), sc, scfg)
	wg.Wait()
	t.Cleanup(func() {
		// Receiver first: its goodbye is read by the sender's ack reader,
		// while a sender's goodbye would wait for a Run that may not exist.
		if r != nil {
			r.Close()
		}
		if s != nil {
			s.Close()
		}
	})
	return s, serr, r, rerr
}

// pipePair connects over net.Pipe and requires success.
func pipePair(t *testing.T, scfg, rcfg Config) (*Sender, *Receiver) {
	t.Helper()
	a, b := net.Pipe()
	s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	return s, r
}

// tcpStreamPair is pipePair over a loopback TCP connection (a descriptor
// the receiver can poll, kernel socket buffers).
func tcpStreamPair(t *testing.T, scfg, rcfg Config) (*Sender, *Receiver) {
	t.Helper()
	a, b := tcpPair(t)
	s, serr, r, rerr := connect(t, a, b, scfg, rcfg)
	require.NoError(t, serr)
	require.NoError(t, rerr)
	return s, r
}

// runReceiver runs r.Run in the background; the channel yields its result.
func runReceiver(t *testing.T, r *Receiver) <-chan error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- r.Run(t.Context()) }()
	return ch
}

func waitErr(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("receiver did not stop")
		return nil
	}
}

// page returns a page filled from seed.
func page(seed uint64) []byte {
	p := make([]byte, PageSize)
	for i := 0; i < PageSize; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], seed*0x9e3779b97f4a7c15+uint64(i))
	}
	return p
}

// proxy sits between sender and receiver. In the sender-to-receiver
// direction it reads whole frames and passes each (with its index, 0 being
// the sender's hello) through mutate, which returns what to forward; a
// nil entry cuts the link. Frames 0 and 1 (hello, auth) carry a MAC, the
// rest an AES-GCM tag.
func proxy(t *testing.T, mutate func(i int, f []byte) [][]byte) (senderSide, receiverSide net.Conn) {
	t.Helper()
	return proxyTrailer(t, mutate, tagSize)
}

// proxyTrailer is proxy for session frames with a trailer of that size
// (crcSize: an unkeyed session).
func proxyTrailer(t *testing.T, mutate func(i int, f []byte) [][]byte, session int) (senderSide, receiverSide net.Conn) {
	t.Helper()
	return proxyFrames(t, nil, mutate, session)
}

// partitionProxy is proxy whose link from the sender dies in the middle
// of the first frame after the handshake (the third): it reads that
// frame's header, closes partitioned and reads nothing more, so that
// the sender's write of the frame stays blocked, as across a partition.
func partitionProxy(t *testing.T, partitioned chan<- struct{}) (senderSide, receiverSide net.Conn) {
	t.Helper()
	halt := func(i int) bool {
		if i < 2 {
			return false
		}
		close(partitioned)
		return true
	}
	return proxyFrames(t, halt, func(_ int, f []byte) [][]byte { return [][]byte{f} }, tagSize)
}

// proxyFrames is proxyTrailer, and where halt (if not nil) says so for
// frame i, once its header is read, it reads nothing more until the test
// ends.
func proxyFrames(t *testing.T, halt func(i int) bool, mutate func(i int, f []byte) [][]byte, session int) (senderSide, receiverSide net.Conn) {
	t.Helper()
	s1, s2 := net.Pipe() // sender <-> proxy
	r1, r2 := net.Pipe() // proxy <-> receiver
	go func() {
		defer r1.Close()
		for i := 0; ; i++ {
			hdr := make([]byte, headerSize)
			if _, err := io.ReadFull(s2, hdr); err != nil {
				return
			}
			if halt != nil && halt(i) {
				<-t.Context().Done() // the link is gone
				return
			}
			n := binary.LittleEndian.Uint32(hdr)
			trailer := session
			if i < 2 {
				trailer = macSize
			} else if session == tagSize {
				trailer = (1 + int(hdr[7])) * tagSize // sealed in parts
			}
			f := make([]byte, headerSize+int(n)+trailer)
			copy(f, hdr)
			if _, err := io.ReadFull(s2, f[headerSize:]); err != nil {
				return
			}
			for _, out := range mutate(i, f) {
				if out == nil { // cut the link here
					return
				}
				if _, err := r1.Write(out); err != nil {
					return
				}
			}
		}
	}()
	go func() {
		defer s2.Close()
		_, _ = io.Copy(s2, r1)
	}()
	return s1, r2
}

// sendCheckpoint sends one checkpoint of n pages (every third one zero)
// and a state, and ends it.
func sendCheckpoint(s *Sender, epoch uint64, kind Kind, n int, state []byte) error {
	if err := s.BeginCheckpoint(epoch, kind); err != nil {
		return err
	}
	for i := range n {
		p := page(epoch*1000 + uint64(i))
		if i%3 == 2 {
			p = make([]byte, PageSize)
		}
		if err := s.SendPage(GPA(i*PageSize), p); err != nil {
			return err
		}
	}
	if err := s.SendState(state); err != nil {
		return err
	}
	return s.EndCheckpoint()
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// memDisks is a DiskSink over in-memory disks, staging until commit.
type memDisks struct {
	mu        sync.Mutex
	disks     [][]byte
	staged    []stagedWrite
	commits   int
	failBegin error
}

type stagedWrite struct {
	disk int
	off  int64
	data []byte
	zero int64 // a zero run of this many bytes (data nil)
}

func newMemDisks(sizes ...int) *memDisks {
	d := &memDisks{}
	for _, n := range sizes {
		d.disks = append(d.disks, make([]byte, n))
	}
	return d
}

func (d *memDisks) Begin(uint64, Kind) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.staged = nil
	return d.failBegin
}

func (d *memDisks) StageWrite(disk int, off int64, data []byte) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if disk >= len(d.disks) || off+int64(len(data)) > int64(len(d.disks[disk])) {
		return fmt.Errorf("disk %d: write at %d+%d out of range", disk, off, len(data))
	}
	d.staged = append(d.staged, stagedWrite{disk: disk, off: off, data: bytes.Clone(data)})
	return nil
}

// StageZero stages the run, not its zeros, as the standby's sink does.
func (d *memDisks) StageZero(disk int, off, n int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if disk >= len(d.disks) || off+n > int64(len(d.disks[disk])) {
		return fmt.Errorf("disk %d: zero run at %d+%d out of range", disk, off, n)
	}
	d.staged = append(d.staged, stagedWrite{disk: disk, off: off, zero: n})
	return nil
}

func (d *memDisks) Commit() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.staged {
		if w.zero > 0 {
			clear(d.disks[w.disk][w.off : w.off+w.zero])
		}
		copy(d.disks[w.disk][w.off:], w.data)
	}
	d.staged = nil
	d.commits++
	return nil
}

func (d *memDisks) Abort() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.staged = nil
}

func (d *memDisks) disk(i int) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	return bytes.Clone(d.disks[i])
}

// tcpPair connects two ends over loopback TCP: unlike net.Pipe, the
// kernel buffers what a busy peer has not read yet.
func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			ch <- nil
			return
		}
		ch <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	b := <-ch
	require.NotNil(t, b)
	return a, b
}

// stored is a Pages frame payload carrying section uncompressed.
func stored(section []byte) []byte {
	b := binary.LittleEndian.AppendUint32([]byte{byte(codecStored), 0, 0, 0}, uint32(len(section)))
	return append(b, section...)
}

// compressed is a Pages frame payload carrying section compressed with
// c (or stored, if that is not smaller).
func compressed(c codec, section []byte) []byte {
	return append([]byte(nil), newPageCodec(c).encode(section)...)
}

// appendPageEntry appends one page section entry to b, well formed or
// not (container.PageSection builds only well-formed ones).
func appendPageEntry(b []byte, gpa GPA, enc container.Encoding, data []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, uint64(gpa))
	b = append(b, byte(enc), 0, 0, 0)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// diskPayload is a Disk frame's payload as a sender stores it (version
// 12): the codec header, then the disk section.
func diskPayload(disk uint16, off uint64, n int, data []byte) []byte {
	var b []byte
	b = putPagesHeader(b, codecStored, container.DiskHeaderSize+len(data))
	return container.AppendDisk(b, disk, off, n, data)
}
