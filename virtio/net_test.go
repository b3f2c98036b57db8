package virtio

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

// fakeBackend is a channel-based NetBackend.
type fakeBackend struct {
	vnet bool
	sent chan []byte

	mu       sync.Mutex
	recv     func([]byte) bool
	started  bool
	closed   bool
	offloads []Offloads
	ready    int // GuestReady calls
}

func newFakeBackend(vnet bool) *fakeBackend {
	return &fakeBackend{vnet: vnet, sent: make(chan []byte, 64)}
}

func (b *fakeBackend) VnetHdr() bool { return b.vnet }
func (b *fakeBackend) Send(frame []byte) error {
	b.sent <- append([]byte(nil), frame...)
	return nil
}
func (b *fakeBackend) SetReceiver(f func([]byte) bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.recv = f
}
func (b *fakeBackend) Start() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.started = true
	return nil
}
func (b *fakeBackend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	return nil
}
func (b *fakeBackend) GuestReady() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.ready++
}
func (b *fakeBackend) readyCalls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ready
}
func (b *fakeBackend) SetOffloads(o Offloads) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.offloads = append(b.offloads, o)
	return nil
}

// inject hands the device a frame as the backend's goroutine would.
func (b *fakeBackend) inject(frame []byte) bool {
	b.mu.Lock()
	f := b.recv
	b.mu.Unlock()
	return f(frame)
}

func (b *fakeBackend) lastOffloads() []Offloads {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]Offloads(nil), b.offloads...)
}

var testMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}

func newTestNet(t testing.TB, mem *guestmem.Memory, host *fakeHost, vnet bool) (*Net, *fakeBackend) {
	t.Helper()
	be := newFakeBackend(vnet)
	n, err := NewNet(mem, host, be, NetConfig{ID: "virtio-net0", MAC: testMAC})
	require.NoError(t, err)
	t.Cleanup(func() { n.Close() })
	return n, be
}

type netRig struct {
	t      *testing.T
	mem    *guestmem.Memory
	host   *fakeHost
	n      *Net
	be     *fakeBackend
	d      *testDriver
	rx, tx *guestRing
}

func newNetRig(t *testing.T, vnet bool, accept func(offered uint64) uint64) *netRig {
	mem := newTestMem(t)
	host := newFakeHost()
	n, be := newTestNet(t, mem, host, vnet)
	d := newDriver(t, n)
	require.NotZero(t, d.negotiate(accept(d.offered()))&StatusFeaturesOK)
	rx := newGuestRing(t, mem, ringBase, 16)
	tx := newGuestRing(t, mem, ringBase+0x20000, 16)
	d.setupQueue(netRXQ, rx, 0)
	d.setupQueue(netTXQ, tx, 1)
	d.driverOK()
	return &netRig{t: t, mem: mem, host: host, n: n, be: be, d: d, rx: rx, tx: tx}
}

func all(f uint64) uint64 { return f }

func testFrame(n int) []byte {
	f := make([]byte, n)
	copy(f, []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00})
	for i := 14; i < n; i++ {
		f[i] = byte(i)
	}
	return f
}

func (r *netRig) sent() []byte {
	r.t.Helper()
	select {
	case f := <-r.be.sent:
		return f
	case <-time.After(5 * time.Second):
		r.t.Fatal("no frame sent")
		return nil
	}
}

func TestNetConfigSpace(t *testing.T) {
	r := newNetRig(t, false, all)
	var mac [6]byte
	for i := range mac {
		mac[i] = byte(r.d.deviceCfg(uint64(i), 1))
	}
	assert.Equal(t, []byte(testMAC), mac[:])
	assert.Equal(t, testMAC, r.n.MAC())
	assert.Equal(t, uint64(netSLinkUp), r.d.deviceCfg(6, 2))
	offered := r.d.offered()
	assert.NotZero(t, offered&netFMrgRxbuf)
	assert.Zero(t, offered&(netFCsum|netFGuestCsum|netFHostTSO4|netFGuestTSO4), "no offloads without a vnet header")
}

func TestNetTX(t *testing.T) {
	for _, vnet := range []bool{false, true} {
		t.Run(map[bool]string{false: "bare", true: "vnet header"}[vnet], func(t *testing.T) {
			r := newNetRig(t, vnet, all)
			frame := testFrame(1514)
			hdr := make([]byte, NetHdrSize)
			if vnet {
				hdr[0] = netHdrFNeedsCsum
				binary.LittleEndian.PutUint16(hdr[6:], 34) // csum_start
				binary.LittleEndian.PutUint16(hdr[8:], 16) // csum_offset
			}
			require.NoError(t, r.mem.WriteAt(hdr, 0x40000))
			require.NoError(t, r.mem.WriteAt(frame[:100], 0x41000))
			require.NoError(t, r.mem.WriteAt(frame[100:], 0x42000))
			r.tx.add(gbuf{0x40000, NetHdrSize, false}, gbuf{0x41000, 100, false}, gbuf{0x42000, 1414, false})
			r.d.kick(netTXQ)
			got := r.sent()
			if vnet {
				assert.Equal(t, append(hdr, frame...), got)
			} else {
				assert.Equal(t, frame, got)
			}
			waitUsed(t, r.tx, 1)
		})
	}
}

func TestNetTXRejectsUnnegotiatedOffload(t *testing.T) {
	r := newNetRig(t, true, func(f uint64) uint64 { return f &^ (netFCsum | netFHostTSO4 | netFHostTSO6 | netFHostECN) })
	hdr := make([]byte, NetHdrSize)
	hdr[0] = netHdrFNeedsCsum
	require.NoError(t, r.mem.WriteAt(hdr, 0x40000))
	r.tx.add(gbuf{0x40000, NetHdrSize, false}, gbuf{0x41000, 60, false})
	r.d.kick(netTXQ)
	waitUsed(t, r.tx, 1)
	assert.Empty(t, r.be.sent)
	_, tx := r.n.Dropped()
	assert.Equal(t, uint64(1), tx)
}

// readRX returns the used element's length and the bytes the device wrote
// into a chain of one writable buffer at gpa.
func (r *netRig) readRX(gpa guestmem.GPA, n uint32) []byte {
	b := make([]byte, n)
	require.NoError(r.t, r.mem.ReadAt(b, gpa))
	return b
}

func TestNetRXMergeable(t *testing.T) {
	r := newNetRig(t, false, all)
	for i := range 4 {
		r.rx.add(gbuf{uint64(0x40000 + i*0x1000), 256, true})
	}
	r.d.kick(netRXQ)
	frame := testFrame(600)
	require.True(t, r.be.inject(frame))
	waitUsed(t, r.rx, 3) // 12 + 600 bytes over 256-byte buffers
	var got []byte
	for i := range 3 {
		id, n, ok := r.rx.takeUsed()
		require.True(t, ok)
		assert.Equal(t, uint32(i), id)
		got = append(got, r.readRX(guestmem.GPA(0x40000+i*0x1000), n)...)
	}
	require.Len(t, got, NetHdrSize+600)
	assert.Equal(t, uint16(3), binary.LittleEndian.Uint16(got[10:]), "num_buffers")
	assert.Equal(t, make([]byte, 10), got[:10], "zero header")
	assert.Equal(t, frame, got[NetHdrSize:])
	waitIRQ(t, func() bool { return r.host.line(testGSI) || len(r.host.msiData()) > 0 }, "RX interrupt")
}

func TestNetRXVnetHdrNoMergeable(t *testing.T) {
	r := newNetRig(t, true, func(f uint64) uint64 { return f &^ netFMrgRxbuf })
	offs := r.be.lastOffloads()
	require.NotEmpty(t, offs)
	assert.Equal(t, Offloads{Csum: true, TSO4: true, TSO6: true, ECN: true}, offs[len(offs)-1])

	r.rx.add(gbuf{0x40000, 100, true}) // too small: the frame is dropped
	r.rx.add(gbuf{0x50000, 4096, true})
	hdr := make([]byte, NetHdrSize)
	hdr[0] = netHdrFDataValid
	frame := append(hdr, testFrame(1000)...)
	require.True(t, r.be.inject(frame))
	require.Eventually(t, func() bool { d, _ := r.n.Dropped(); return d > 0 }, 5*time.Second, time.Millisecond)
	noProgress(t, r.rx, 0)
	rxDrop, _ := r.n.Dropped()
	assert.Equal(t, uint64(1), rxDrop)

	// A driver without mergeable buffers posts big ones; use the second.
	r2 := newNetRig(t, true, func(f uint64) uint64 { return f &^ netFMrgRxbuf })
	r2.rx.add(gbuf{0x50000, 4096, true})
	require.True(t, r2.be.inject(frame))
	waitUsed(t, r2.rx, 1)
	_, n, _ := r2.rx.takeUsed()
	got := r2.readRX(0x50000, n)
	want := append([]byte(nil), frame...)
	binary.LittleEndian.PutUint16(want[10:], 1)
	assert.Equal(t, want, got)
}

func TestNetRXWaitsForBuffers(t *testing.T) {
	r := newNetRig(t, false, all)
	frame := testFrame(60)
	require.True(t, r.be.inject(frame), "queued while the guest has no buffer")
	noProgress(t, r.rx, 0)
	r.rx.add(gbuf{0x40000, 2048, true})
	r.d.kick(netRXQ)
	waitUsed(t, r.rx, 1)
	_, n, _ := r.rx.takeUsed()
	assert.Equal(t, frame, r.readRX(0x40000, n)[NetHdrSize:])

	// The wait queue is bounded.
	accepted := 0
	for range rxQueueFrames + 10 {
		if r.be.inject(frame) {
			accepted++
		}
	}
	assert.Equal(t, rxQueueFrames, accepted)
}

func TestNetRXBeforeDriverOK(t *testing.T) {
	mem := newTestMem(t)
	_, be := newTestNet(t, mem, newFakeHost(), false)
	assert.False(t, be.inject(testFrame(60)))
	assert.Zero(t, be.readyCalls(), "guest ready before DRIVER_OK")
}

func TestNetFeatureDependencies(t *testing.T) {
	mem := newTestMem(t)
	n, _ := newTestNet(t, mem, newFakeHost(), true)
	d := newDriver(t, n)
	ok := uint8(StatusAcknowledge | StatusDriver | StatusFeaturesOK)
	assert.Equal(t, ok, d.negotiate(FeatureVersion1|netFGuestCsum|netFGuestTSO4))
	assert.Zero(t, d.negotiate(FeatureVersion1|netFGuestTSO4)&StatusFeaturesOK, "TSO without csum")
	assert.Zero(t, d.negotiate(FeatureVersion1|netFCsum|netFHostECN)&StatusFeaturesOK, "ECN without TSO")
}

func TestNetResetTellsBackend(t *testing.T) {
	r := newNetRig(t, true, all)
	assert.Equal(t, 1, r.be.readyCalls(), "DRIVER_OK tells the backend the guest is ready")
	r.d.setStatus(0)
	offs := r.be.lastOffloads()
	assert.Equal(t, Offloads{}, offs[len(offs)-1])
	assert.False(t, r.be.inject(testFrame(60)), "no receive after reset")
}

func TestNetMalformedRXRing(t *testing.T) {
	r := newNetRig(t, false, all)
	r.d.enableMSIX(2, 0x99) // config vector
	r.d.write(r.d.common+regConfigMSIX, 2, 2)
	r.rx.publish(200) // head out of range
	require.True(t, r.be.inject(testFrame(60)))
	require.Eventually(t, func() bool { return r.d.status()&StatusDeviceNeedsReset != 0 }, 5*time.Second, time.Millisecond)
	require.Eventually(t, func() bool { return bytes.Contains(u32s(r.host.msiData()), []byte{0x99}) }, 5*time.Second, time.Millisecond)
}

func u32s(v []uint32) []byte {
	var b []byte
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, x)
	}
	return b
}

func TestNetSaveRestore(t *testing.T) {
	r := newNetRig(t, false, all)
	r.rx.add(gbuf{0x40000, 2048, true})
	require.True(t, r.be.inject(testFrame(60)))
	waitUsed(t, r.rx, 1)
	require.NoError(t, r.n.Quiesce(context.Background()))
	s, err := r.n.SaveState()
	require.NoError(t, err)

	n2, be2 := newTestNet(t, r.mem, r.host, false)
	assert.Zero(t, be2.readyCalls())
	require.NoError(t, n2.RestoreState(s))
	assert.Equal(t, 1, be2.readyCalls(), "a restored DRIVER_OK tells the backend the guest is ready")
	s2, err := n2.SaveState()
	require.NoError(t, err)
	assert.Equal(t, s, s2)
	require.NoError(t, r.n.Close())
	require.NoError(t, n2.Resume())

	// The new device continues where the old one stopped, both ways.
	r.rx.add(gbuf{0x41000, 2048, true})
	r.d.dev = n2
	r.d.kick(netRXQ)
	require.True(t, be2.inject(testFrame(70)))
	waitUsed(t, r.rx, 2)
	require.NoError(t, r.mem.WriteAt(make([]byte, NetHdrSize), 0x48000))
	require.NoError(t, r.mem.WriteAt(testFrame(60), 0x48000+NetHdrSize))
	r.tx.add(gbuf{0x48000, NetHdrSize + 60, false})
	r.d.kick(netTXQ)
	select {
	case f := <-be2.sent:
		assert.Equal(t, testFrame(60), f)
	case <-time.After(5 * time.Second):
		t.Fatal("no frame sent by the restored device")
	}

	t.Run("other mac refused", func(t *testing.T) {
		be := newFakeBackend(false)
		n3, err := NewNet(r.mem, r.host, be, NetConfig{ID: "virtio-net0", MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}})
		require.NoError(t, err)
		defer n3.Close()
		assert.Error(t, n3.RestoreState(s))
	})
}
