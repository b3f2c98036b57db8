package virtio

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/pci"
)

// fakeHost is the interrupt sink and ioeventfd registry a machine would
// be; it records what devices asked of it.
type fakeHost struct {
	mu       sync.Mutex
	msis     []uint32 // MSI data values
	lines    map[uint32]bool
	ioevents map[uint64]int // addr -> eventfd
}

func newFakeHost() *fakeHost {
	return &fakeHost{lines: map[uint32]bool{}, ioevents: map[uint64]int{}}
}

func (h *fakeHost) SendMSI(addr uint64, data uint32) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.msis = append(h.msis, data)
	return nil
}

func (h *fakeHost) AddIOEvent(addr uint64, size uint32, fd int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if size != 2 {
		panic("unexpected ioeventfd size")
	}
	h.ioevents[addr] = fd
	return nil
}

func (h *fakeHost) RemoveIOEvent(addr uint64, size uint32, fd int) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ioevents[addr] != fd {
		panic("removing an ioeventfd that was not added")
	}
	delete(h.ioevents, addr)
	return nil
}

func (h *fakeHost) SetIRQLine(gsi uint32, level bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lines[gsi] = level
	return nil
}

func (h *fakeHost) line(gsi uint32) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lines[gsi]
}

func (h *fakeHost) msiData() []uint32 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]uint32(nil), h.msis...)
}

func (h *fakeHost) ioeventAddrs() map[uint64]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m := map[uint64]int{}
	for k, v := range h.ioevents {
		m[k] = v
	}
	return m
}

const testGSI = 11

// testDriver is a minimal virtio-pci driver: it finds the regions through
// the vendor capabilities and speaks to the device only through config
// space and ReadBAR/WriteBAR, as a guest would.
type testDriver struct {
	t                       testing.TB
	dev                     pci.Device
	common, notify, isr, dc uint64
	mult                    uint64
	msixCap                 int
}

func newDriver(t testing.TB, dev pci.Device) *testDriver {
	t.Helper()
	cfg := dev.Config()
	// What the host bridge does on attach.
	cfg.SetInterrupt(testGSI, 1)
	cfg.Write(pci.RegCommand, []byte{pci.CommandMemory | pci.CommandMaster, 0})
	d := &testDriver{t: t, dev: dev}
	var b [20]byte
	cfg.Read(pci.RegCapPtr, b[:1])
	seen := 0
	for p := int(b[0]); p != 0; p = int(b[1]) {
		cfg.Read(p, b[:])
		switch b[0] {
		case pci.CapMSIX:
			d.msixCap = p
		case pci.CapVendor:
			require.Equal(t, byte(0), b[4], "bar")
			off := uint64(binary.LittleEndian.Uint32(b[8:]))
			switch b[3] {
			case capCommonCfg:
				d.common = off
			case capNotifyCfg:
				d.notify = off
				d.mult = uint64(binary.LittleEndian.Uint32(b[16:]))
			case capISRCfg:
				d.isr = off
			case capDeviceCfg:
				d.dc = off
			}
			seen++
		}
	}
	require.Equal(t, 4, seen, "vendor capabilities")
	require.NotZero(t, d.msixCap)
	return d
}

func (d *testDriver) read(off uint64, n int) uint64 {
	b := make([]byte, n)
	d.dev.ReadBAR(0, off, b)
	var v uint64
	for i := n - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func (d *testDriver) write(off uint64, n int, v uint64) {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	d.dev.WriteBAR(0, off, b)
}

func (d *testDriver) status() uint8                      { return uint8(d.read(d.common+regDeviceStatus, 1)) }
func (d *testDriver) setStatus(s uint8)                  { d.write(d.common+regDeviceStatus, 1, uint64(s)) }
func (d *testDriver) readISR() uint8                     { return uint8(d.read(d.isr, 1)) }
func (d *testDriver) selectQueue(i int)                  { d.write(d.common+regQueueSelect, 2, uint64(i)) }
func (d *testDriver) deviceCfg(off uint64, n int) uint64 { return d.read(d.dc+off, n) }

func (d *testDriver) offered() uint64 {
	d.write(d.common+regDeviceFeatureSel, 4, 0)
	lo := d.read(d.common+regDeviceFeature, 4)
	d.write(d.common+regDeviceFeatureSel, 4, 1)
	return lo | d.read(d.common+regDeviceFeature, 4)<<32
}

// negotiate resets the device and runs §3.1.1 up to FEATURES_OK, accepting
// the given features; it returns the status read back.
func (d *testDriver) negotiate(accept uint64) uint8 {
	d.setStatus(0)
	require.Equal(d.t, uint8(0), d.status())
	d.setStatus(StatusAcknowledge)
	d.setStatus(StatusAcknowledge | StatusDriver)
	d.write(d.common+regDriverFeatureSel, 4, 0)
	d.write(d.common+regDriverFeature, 4, accept&0xffffffff)
	d.write(d.common+regDriverFeatureSel, 4, 1)
	d.write(d.common+regDriverFeature, 4, accept>>32)
	d.setStatus(StatusAcknowledge | StatusDriver | StatusFeaturesOK)
	return d.status()
}

// setupQueue programs queue i with g's layout and enables it.
func (d *testDriver) setupQueue(i int, g *guestRing, vector uint16) {
	d.selectQueue(i)
	require.Equal(d.t, uint64(MaxQueueSize), d.read(d.common+regQueueSize, 2))
	d.write(d.common+regQueueSize, 2, uint64(g.size))
	d.write(d.common+regQueueMSIX, 2, uint64(vector))
	d.write(d.common+regQueueDescLo, 4, uint64(g.desc))
	d.write(d.common+regQueueDescHi, 4, 0)
	d.write(d.common+regQueueDriverLo, 4, uint64(g.avail))
	d.write(d.common+regQueueDriverHi, 4, 0)
	d.write(d.common+regQueueDeviceLo, 4, uint64(g.used))
	d.write(d.common+regQueueDeviceHi, 4, 0)
	d.write(d.common+regQueueEnable, 2, 1)
}

func (d *testDriver) driverOK() {
	d.setStatus(StatusAcknowledge | StatusDriver | StatusFeaturesOK | StatusDriverOK)
	require.Equal(d.t, uint8(StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK), d.status())
}

func (d *testDriver) kick(i int) {
	d.selectQueue(i)
	off := d.read(d.common+regQueueNotifyOff, 2)
	d.write(d.notify+off*d.mult, 2, uint64(i))
}

// enableMSIX turns MSI-X on and programs vector v to send data.
func (d *testDriver) enableMSIX(v int, data uint32) {
	cfg := d.dev.Config()
	var ctl [2]byte
	cfg.Read(d.msixCap+2, ctl[:])
	ctl[1] |= 0x80 // enable
	cfg.Write(d.msixCap+2, ctl[:])
	d.write(msixTableOff+uint64(16*v), 4, 0xfee00000)
	d.write(msixTableOff+uint64(16*v)+8, 4, uint64(data))
	d.write(msixTableOff+uint64(16*v)+12, 4, 0) // unmask
}

// waitUsed waits for the device to publish used idx n on g.
func waitUsed(t testing.TB, g *guestRing, n uint16) {
	t.Helper()
	require.Eventually(t, func() bool { return g.usedIdx() == n }, 5*time.Second, time.Millisecond,
		"used idx %d, want %d", g.usedIdx(), n)
}

// waitIRQ waits for the device's interrupt after a completion: the
// device publishes used idx first and signals after, so the guest side
// (waitUsed) can see the one before the other.
func waitIRQ(t testing.TB, raised func() bool, msg string) {
	t.Helper()
	require.Eventually(t, raised, 5*time.Second, time.Millisecond, msg)
}

// noProgress checks that the device leaves used idx at n for a while.
func noProgress(t testing.TB, g *guestRing, n uint16) {
	t.Helper()
	require.Never(t, func() bool { return g.usedIdx() != n }, 100*time.Millisecond, 5*time.Millisecond)
}

func TestTransportIdentity(t *testing.T) {
	mem := newTestMem(t)
	host := newFakeHost()
	b := newTestBlock(t, mem, host, BlockConfig{})
	n, _ := newTestNet(t, mem, host, false)
	for _, tt := range []struct {
		dev                 pci.Device
		deviceID            uint16
		class, sub          byte
		queues              uint64
		defaultNotifyStride uint64
	}{
		{b, 0x1042, 0x01, 0x00, 1, 4},
		{n, 0x1041, 0x02, 0x00, 2, 4},
	} {
		cfg := tt.dev.Config()
		assert.Equal(t, uint16(0x1af4), cfg.Uint16(pci.RegVendorID))
		assert.Equal(t, tt.deviceID, cfg.Uint16(pci.RegDeviceID))
		assert.Equal(t, uint16(0x1af4), cfg.Uint16(pci.RegSubVendorID))
		var id [4]byte
		cfg.Read(pci.RegRevision, id[:])
		assert.Equal(t, [4]byte{1, 0, tt.sub, tt.class}, id)
		d := newDriver(t, tt.dev)
		assert.Equal(t, tt.defaultNotifyStride, d.mult)
		assert.Equal(t, tt.queues, d.read(d.common+regNumQueues, 2))
		assert.NotZero(t, d.offered()&FeatureVersion1)
		assert.Equal(t, uint64(pci.NoVector), d.read(d.common+regConfigMSIX, 2))
	}
}

func TestFeatureNegotiation(t *testing.T) {
	mem := newTestMem(t)
	b := newTestBlock(t, mem, newFakeHost(), BlockConfig{})
	d := newDriver(t, b)
	offered := d.offered()
	ok := uint8(StatusAcknowledge | StatusDriver | StatusFeaturesOK)
	assert.Equal(t, ok, d.negotiate(offered), "everything offered")
	assert.Equal(t, ok, d.negotiate(FeatureVersion1), "only VERSION_1")
	assert.Equal(t, ok&^StatusFeaturesOK, d.negotiate(offered&^FeatureVersion1), "legacy driver refused")
	assert.Equal(t, ok&^StatusFeaturesOK, d.negotiate(offered|1<<40), "feature not offered refused")

	// DRIVER_OK without FEATURES_OK does not start the device.
	d.setStatus(StatusAcknowledge | StatusDriver | StatusDriverOK)
	assert.Zero(t, d.status()&StatusDriverOK)

	// Driver features cannot change after FEATURES_OK.
	d.negotiate(FeatureVersion1)
	d.write(d.common+regDriverFeatureSel, 4, 0)
	d.write(d.common+regDriverFeature, 4, blkFFlush)
	assert.Zero(t, d.read(d.common+regDriverFeature, 4))
}

func TestResetRestoresDefaults(t *testing.T) {
	mem := newTestMem(t)
	b := newTestBlock(t, mem, newFakeHost(), BlockConfig{})
	d := newDriver(t, b)
	d.negotiate(d.offered())
	g := newGuestRing(t, mem, ringBase, 16)
	d.setupQueue(0, g, 0)
	d.write(d.common+regConfigMSIX, 2, 1)
	d.driverOK()
	d.setStatus(0)
	assert.Equal(t, uint8(0), d.status())
	d.selectQueue(0)
	assert.Equal(t, uint64(MaxQueueSize), d.read(d.common+regQueueSize, 2))
	assert.Equal(t, uint64(0), d.read(d.common+regQueueEnable, 2))
	assert.Equal(t, uint64(pci.NoVector), d.read(d.common+regQueueMSIX, 2))
	assert.Equal(t, uint64(0), d.read(d.common+regQueueDescLo, 8))
	assert.Equal(t, uint64(pci.NoVector), d.read(d.common+regConfigMSIX, 2))
	d.write(d.common+regQueueMSIX, 2, 99)
	assert.Equal(t, uint64(pci.NoVector), d.read(d.common+regQueueMSIX, 2), "vector the table lacks")
}

func TestQueueLayoutFrozenWhileRunning(t *testing.T) {
	mem := newTestMem(t)
	b := newTestBlock(t, mem, newFakeHost(), BlockConfig{})
	d := newDriver(t, b)
	d.negotiate(d.offered())
	g := newGuestRing(t, mem, ringBase, 16)
	d.setupQueue(0, g, 0)
	d.driverOK()
	d.selectQueue(0)
	d.write(d.common+regQueueDescLo, 4, 0x80000)
	d.write(d.common+regQueueSize, 2, 4)
	assert.Equal(t, uint64(ringBase), d.read(d.common+regQueueDescLo, 4))
	assert.Equal(t, uint64(16), d.read(d.common+regQueueSize, 2))
}

func TestBadQueueLayoutNeedsReset(t *testing.T) {
	mem := newTestMem(t)
	host := newFakeHost()
	b := newTestBlock(t, mem, host, BlockConfig{})
	d := newDriver(t, b)
	d.negotiate(d.offered())
	g := newGuestRing(t, mem, 1<<20-0x1000, 16) // used ring past the end of RAM
	d.setupQueue(0, g, 0)
	assert.NotZero(t, d.status()&StatusDeviceNeedsReset)
	assert.True(t, host.line(testGSI), "config change raised INTx")
	assert.Equal(t, uint8(isrConfig), d.readISR())
	assert.False(t, host.line(testGSI), "ISR read lowers INTx")
}

func TestMSIXFunctionMaskAndINTxDisable(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	cfg := r.blk.Config()

	// INTx-disable holds the line low; clearing it raises the pending ISR.
	cfg.Write(0x04, []byte{0x06, 0x04}) // memory, master, INTx disable
	r.blk.ConfigChanged()
	st, _ := r.do(blkTFlush, 0)
	require.Equal(t, byte(blkSOK), st)
	assert.False(t, r.host.line(testGSI))
	cfg.Write(0x04, []byte{0x06, 0x00})
	r.blk.ConfigChanged()
	waitIRQ(t, func() bool { return r.host.line(testGSI) }, "INTx raised once enabled")
	r.d.readISR()

	// A function-masked vector stays pending until the mask is cleared.
	r.d.enableMSIX(0, 0x41)
	var ctl [2]byte
	cfg.Read(r.d.msixCap+2, ctl[:])
	ctl[1] |= 0x40 // function mask
	cfg.Write(r.d.msixCap+2, ctl[:])
	r.blk.ConfigChanged()
	st, _ = r.do(blkTFlush, 0)
	require.Equal(t, byte(blkSOK), st)
	assert.Empty(t, r.host.msiData())
	ctl[1] &^= 0x40
	cfg.Write(r.d.msixCap+2, ctl[:])
	r.blk.ConfigChanged()
	waitIRQ(t, func() bool { return len(r.host.msiData()) > 0 }, "pending MSI-X sent once unmasked")
	assert.Equal(t, []uint32{0x41}, r.host.msiData())
}
