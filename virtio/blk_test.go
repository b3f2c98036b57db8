package virtio

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/vmm/guestmem"
)

const diskSize = 1 << 20

// newDiskImage writes a disk image whose every byte is a function of its
// offset, so reads can be checked.
func newDiskImage(t testing.TB) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, diskSize)
	for i := range img {
		img[i] = byte(i*7 + i>>9)
	}
	require.NoError(t, os.WriteFile(p, img, 0o644))
	return p
}

func newTestBlock(t testing.TB, mem *guestmem.Memory, host *fakeHost, cfg BlockConfig) *Block {
	t.Helper()
	if cfg.ID == "" {
		cfg.ID = "virtio-blk0"
	}
	if cfg.Path == "" {
		cfg.Path = newDiskImage(t)
	}
	b, err := NewBlock(mem, host, cfg)
	require.NoError(t, err)
	t.Cleanup(func() { b.Close() })
	return b
}

// blkRig is a running virtio-blk device with a driver and one queue.
type blkRig struct {
	t    *testing.T
	mem  *guestmem.Memory
	host *fakeHost
	blk  *Block
	d    *testDriver
	g    *guestRing
}

func newBlkRig(t *testing.T, cfg BlockConfig) *blkRig {
	mem := newTestMem(t)
	host := newFakeHost()
	b := newTestBlock(t, mem, host, cfg)
	d := newDriver(t, b)
	require.NotZero(t, d.negotiate(d.offered())&StatusFeaturesOK)
	g := newGuestRing(t, mem, ringBase, 16)
	d.setupQueue(0, g, 0)
	d.driverOK()
	return &blkRig{t: t, mem: mem, host: host, blk: b, d: d, g: g}
}

// Guest addresses of the request parts.
const (
	reqHdrGPA    = 0x30000
	reqStatusGPA = 0x31000
	reqDataGPA   = 0x40000
)

// post queues a request (header, data buffers, status) without kicking.
func (r *blkRig) post(typ uint32, sector uint64, data []gbuf, indirect bool) {
	var hdr [blkHdrSize]byte
	binary.LittleEndian.PutUint32(hdr[0:], typ)
	binary.LittleEndian.PutUint64(hdr[8:], sector)
	require.NoError(r.t, r.mem.WriteAt(hdr[:], reqHdrGPA))
	require.NoError(r.t, r.mem.WriteAt([]byte{0xee}, reqStatusGPA))
	bufs := append([]gbuf{{reqHdrGPA, blkHdrSize, false}}, data...)
	bufs = append(bufs, gbuf{reqStatusGPA, 1, true})
	if indirect {
		r.g.addIndirect(bufs...)
	} else {
		r.g.add(bufs...)
	}
}

// do posts a request, kicks, waits for completion and returns the status
// and the used length.
func (r *blkRig) do(typ uint32, sector uint64, data ...gbuf) (byte, uint32) {
	r.t.Helper()
	r.post(typ, sector, data, false)
	r.d.kick(0)
	waitUsed(r.t, r.g, r.g.availIdx)
	_, n, ok := r.g.takeUsed()
	require.True(r.t, ok)
	var st [1]byte
	require.NoError(r.t, r.mem.ReadAt(st[:], reqStatusGPA))
	return st[0], n
}

func TestBlockConfig(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	assert.Equal(t, uint64(diskSize/512), r.d.deviceCfg(0, 8), "capacity")
	assert.Equal(t, uint64(blkSegMax), r.d.deviceCfg(12, 4))
	assert.Equal(t, uint64(512), r.d.deviceCfg(20, 4))
	assert.Zero(t, r.d.offered()&blkFRO)
	assert.NotZero(t, r.d.offered()&blkFFlush)
}

func TestNewBlockErrors(t *testing.T) {
	mem := newTestMem(t)
	_, err := NewBlock(mem, newFakeHost(), BlockConfig{ID: "virtio-blk0", Path: "/nonexistent/disk.img"})
	require.ErrorIs(t, err, os.ErrNotExist)
	assert.Contains(t, err.Error(), "virtio-blk virtio-blk0: open disk image")
}

func TestBlockRequests(t *testing.T) {
	img := newDiskImage(t)
	want, err := os.ReadFile(img)
	require.NoError(t, err)
	r := newBlkRig(t, BlockConfig{Path: img, Serial: "serial-123"})

	t.Run("read two segments", func(t *testing.T) {
		st, n := r.do(blkTIn, 3, gbuf{reqDataGPA, 1024, true}, gbuf{reqDataGPA + 0x2000, 512, true})
		require.Equal(t, byte(blkSOK), st)
		assert.Equal(t, uint32(1024+512+1), n)
		got := make([]byte, 1536)
		require.NoError(t, r.mem.ReadAt(got[:1024], reqDataGPA))
		require.NoError(t, r.mem.ReadAt(got[1024:], reqDataGPA+0x2000))
		assert.Equal(t, want[3*512:3*512+1536], got)
	})
	t.Run("write then read back", func(t *testing.T) {
		data := bytes.Repeat([]byte("govmm!!!"), 128) // 1024 bytes
		require.NoError(t, r.mem.WriteAt(data, reqDataGPA))
		st, n := r.do(blkTOut, 10, gbuf{reqDataGPA, 1024, false})
		require.Equal(t, byte(blkSOK), st)
		assert.Equal(t, uint32(1), n)
		onDisk, err := os.ReadFile(img)
		require.NoError(t, err)
		assert.Equal(t, data, onDisk[10*512:10*512+1024])
	})
	t.Run("flush", func(t *testing.T) {
		st, _ := r.do(blkTFlush, 0)
		assert.Equal(t, byte(blkSOK), st)
	})
	t.Run("get id", func(t *testing.T) {
		st, n := r.do(blkTGetID, 0, gbuf{reqDataGPA, 20, true})
		require.Equal(t, byte(blkSOK), st)
		assert.Equal(t, uint32(21), n)
		id := make([]byte, 20)
		require.NoError(t, r.mem.ReadAt(id, reqDataGPA))
		assert.Equal(t, "serial-123", string(bytes.TrimRight(id, "\x00")))
	})
	t.Run("unsupported type", func(t *testing.T) {
		st, _ := r.do(14 /* SECURE_ERASE */, 0, gbuf{reqDataGPA, 16, false})
		assert.Equal(t, byte(blkSUnsupp), st)
	})
	errCases := []struct {
		name   string
		typ    uint32
		sector uint64
		data   gbuf
	}{
		{"read at capacity", blkTIn, diskSize / 512, gbuf{reqDataGPA, 512, true}},
		{"read across the end", blkTIn, diskSize/512 - 1, gbuf{reqDataGPA, 1024, true}},
		{"write across the end", blkTOut, diskSize/512 - 1, gbuf{reqDataGPA, 1024, false}},
		{"huge sector", blkTIn, ^uint64(0) / 256, gbuf{reqDataGPA, 512, true}},
		{"partial sector", blkTIn, 0, gbuf{reqDataGPA, 100, true}},
	}
	for _, tt := range errCases {
		t.Run(tt.name, func(t *testing.T) {
			st, _ := r.do(tt.typ, tt.sector, tt.data)
			assert.Equal(t, byte(blkSIOErr), st)
		})
	}
	t.Run("indirect read", func(t *testing.T) {
		r.post(blkTIn, 0, []gbuf{{reqDataGPA, 4096, true}}, true)
		r.d.kick(0)
		waitUsed(t, r.g, r.g.availIdx)
		r.g.takeUsed()
		got := make([]byte, 4096)
		require.NoError(t, r.mem.ReadAt(got, reqDataGPA))
		assert.Equal(t, want[:4096], got)
	})
	t.Run("request without status byte", func(t *testing.T) {
		r.g.add(gbuf{reqHdrGPA, blkHdrSize, false})
		r.d.kick(0)
		waitUsed(t, r.g, r.g.availIdx)
		_, n, _ := r.g.takeUsed()
		assert.Zero(t, n)
		assert.Zero(t, r.d.status()&StatusDeviceNeedsReset, "a device error, not a broken ring")
	})
}

func TestBlockReadMarksDirty(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	// DRIVER_OK asked the worker to look at the queue; quiesced, it cannot
	// take the request before the test driver's writes are forgotten.
	require.NoError(t, r.blk.Quiesce(context.Background()))
	reg := r.mem.Regions()[0]
	r.post(blkTIn, 0, []gbuf{{reqDataGPA, 3 * 4096, true}}, false)
	reg.HarvestVMMDirty(make([]uint64, reg.BitmapWords())) // forget the test driver's writes
	require.NoError(t, r.blk.Resume())
	r.d.kick(0)
	waitUsed(t, r.g, r.g.availIdx)
	bm := make([]uint64, reg.BitmapWords())
	reg.HarvestVMMDirty(bm)
	for _, gpa := range []uint64{reqDataGPA, reqDataGPA + 4096, reqDataGPA + 8192, reqStatusGPA, uint64(r.g.used)} {
		p := gpa / guestmem.PageSize
		assert.NotZero(t, bm[p/64]&(1<<(p%64)), "page of %#x dirty", gpa)
	}
}

func TestBlockReadOnly(t *testing.T) {
	img := newDiskImage(t)
	before, err := os.ReadFile(img)
	require.NoError(t, err)
	r := newBlkRig(t, BlockConfig{Path: img, ReadOnly: true})
	assert.NotZero(t, r.d.offered()&blkFRO)
	st, _ := r.do(blkTOut, 0, gbuf{reqDataGPA, 512, false})
	assert.Equal(t, byte(blkSIOErr), st)
	st, _ = r.do(blkTIn, 0, gbuf{reqDataGPA, 512, true})
	assert.Equal(t, byte(blkSOK), st)
	after, err := os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, before, after)
}

// A write that AllowWrite refuses fails with IOERR before it touches the
// image (a fenced VMM's disk); reads go on.
func TestBlockWriteRefused(t *testing.T) {
	img := newDiskImage(t)
	before, err := os.ReadFile(img)
	require.NoError(t, err)
	var refuse atomic.Bool
	var mirrored atomic.Int64
	r := newBlkRig(t, BlockConfig{Path: img,
		AllowWrite: func() error {
			if refuse.Load() {
				return errors.New("fenced")
			}
			return nil
		},
		OnWrite: func(int64, []byte) error { mirrored.Add(1); return nil }})
	refuse.Store(true)
	st, _ := r.do(blkTOut, 0, gbuf{reqDataGPA, 512, false})
	assert.Equal(t, byte(blkSIOErr), st)
	st, _ = r.do(blkTIn, 0, gbuf{reqDataGPA, 512, true})
	assert.Equal(t, byte(blkSOK), st)
	after, err := os.ReadFile(img)
	require.NoError(t, err)
	assert.Equal(t, before, after, "a refused write never reaches the image")
	assert.Zero(t, mirrored.Load(), "nor the mirror")
	refuse.Store(false)
	st, _ = r.do(blkTOut, 0, gbuf{reqDataGPA, 512, false})
	assert.Equal(t, byte(blkSOK), st)
	assert.Equal(t, int64(1), mirrored.Load())
}

func TestBlockObservers(t *testing.T) {
	var mu sync.Mutex
	var writes []int64
	var flushes int
	r := newBlkRig(t, BlockConfig{
		OnWrite: func(off int64, p []byte) error {
			mu.Lock()
			defer mu.Unlock()
			writes = append(writes, off, int64(len(p)))
			return nil
		},
		OnFlush: func() error {
			mu.Lock()
			defer mu.Unlock()
			flushes++
			return nil
		},
	})
	st, _ := r.do(blkTOut, 2, gbuf{reqDataGPA, 512, false}, gbuf{reqDataGPA + 0x1000, 1024, false})
	require.Equal(t, byte(blkSOK), st)
	st, _ = r.do(blkTFlush, 0)
	require.Equal(t, byte(blkSOK), st)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []int64{1024, 512, 1536, 1024}, writes)
	assert.Equal(t, 1, flushes)
}

func TestBlockMalformedRing(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	putDesc(t, r.mem, r.g.desc, 0, desc{addr: reqHdrGPA, len: 16, flags: descFNext, next: 0})
	r.g.publish(0)
	r.d.kick(0)
	require.Eventually(t, func() bool { return r.d.status()&StatusDeviceNeedsReset != 0 }, 5e9, 1e6)
	waitIRQ(t, func() bool { return r.host.line(testGSI) }, "config interrupt for needs-reset")
	assert.Equal(t, uint8(isrConfig), r.d.readISR())
	assert.Equal(t, uint16(0), r.g.usedIdx())

	// Broken: further requests are ignored until reset.
	r.post(blkTIn, 0, []gbuf{{reqDataGPA, 512, true}}, false)
	r.d.kick(0)
	noProgress(t, r.g, 0)

	// After a reset the device works again.
	require.NotZero(t, r.d.negotiate(r.d.offered())&StatusFeaturesOK)
	r.g = newGuestRing(t, r.mem, 0x70000, 16)
	r.d.setupQueue(0, r.g, 0)
	r.d.driverOK()
	st, _ := r.do(blkTIn, 0, gbuf{reqDataGPA, 512, true})
	assert.Equal(t, byte(blkSOK), st)
}

func TestBlockINTxAndMSIX(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	st, _ := r.do(blkTFlush, 0)
	require.Equal(t, byte(blkSOK), st)
	waitIRQ(t, func() bool { return r.host.line(testGSI) }, "INTx raised")
	assert.Equal(t, uint8(isrQueue), r.d.readISR())
	assert.False(t, r.host.line(testGSI), "ISR read lowered INTx")
	assert.Equal(t, uint8(0), r.d.readISR(), "read to clear")

	r.d.enableMSIX(0, 0x41) // the queue was set up with vector 0
	st, _ = r.do(blkTFlush, 0)
	require.Equal(t, byte(blkSOK), st)
	waitIRQ(t, func() bool { return len(r.host.msiData()) > 0 }, "MSI-X message sent")
	assert.Equal(t, []uint32{0x41}, r.host.msiData())
	assert.False(t, r.host.line(testGSI))
}

func TestBlockIOEventFD(t *testing.T) {
	mem := newTestMem(t)
	host := newFakeHost()
	b := newTestBlock(t, mem, host, BlockConfig{UseIOEventFD: true})
	const bar = 0xe000_0000
	b.BARMapped(0, bar)
	ev := host.ioeventAddrs()
	require.Contains(t, ev, uint64(bar+notifyOff))
	b.BARMapped(0, bar+0x10000) // moved
	ev = host.ioeventAddrs()
	require.Len(t, ev, 1)
	fd, ok := ev[bar+0x10000+notifyOff]
	require.True(t, ok)

	d := newDriver(t, b)
	d.negotiate(d.offered())
	g := newGuestRing(t, mem, ringBase, 16)
	d.setupQueue(0, g, 0)
	d.driverOK()
	r := &blkRig{t: t, mem: mem, host: host, blk: b, d: d, g: g}
	r.post(blkTFlush, 0, nil, false)
	signal(fd) // what KVM does on the guest's notify write
	waitUsed(t, g, 1)

	b.BARMapped(0, 0)
	assert.Empty(t, host.ioeventAddrs(), "unmapped")
	b.BARMapped(0, bar)
	require.NoError(t, b.Close())
	assert.Empty(t, host.ioeventAddrs(), "closed")
	require.NoError(t, b.Close(), "idempotent")
}

func TestBlockSaveRestore(t *testing.T) {
	img := newDiskImage(t)
	r := newBlkRig(t, BlockConfig{Path: img})
	r.d.enableMSIX(0, 0x41)
	st, _ := r.do(blkTIn, 1, gbuf{reqDataGPA, 512, true})
	require.Equal(t, byte(blkSOK), st)

	ctx := context.Background()
	require.NoError(t, r.blk.Quiesce(ctx))
	// Quiesced: a request posted now waits.
	r.post(blkTIn, 2, []gbuf{{reqDataGPA, 512, true}}, false)
	r.d.kick(0)
	noProgress(t, r.g, 1)
	s, err := r.blk.SaveState()
	require.NoError(t, err)
	assert.Equal(t, "virtio-blk", s.Kind)
	assert.Equal(t, "virtio-blk0", s.ID)

	// A fresh device on the same memory and image takes over.
	b2 := newTestBlock(t, r.mem, r.host, BlockConfig{Path: img})
	require.NoError(t, b2.RestoreState(s))
	s2, err := b2.SaveState()
	require.NoError(t, err)
	assert.Equal(t, s, s2, "save → restore → save is identical")
	require.NoError(t, r.blk.Close())
	require.NoError(t, b2.Resume())
	waitUsed(t, r.g, 2) // the waiting request is served by the new device
	waitIRQ(t, func() bool { return len(r.host.msiData()) >= 2 }, "MSI-X message for the second request")
	assert.Equal(t, []uint32{0x41, 0x41}, r.host.msiData(), "MSI-X state came along")

	d2 := newDriver(t, b2)
	assert.Equal(t, uint8(StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK), d2.status())

	t.Run("mismatched device refused", func(t *testing.T) {
		b3 := newTestBlock(t, r.mem, r.host, BlockConfig{ReadOnly: true})
		assert.Error(t, b3.RestoreState(s))
	})
	t.Run("discard negotiated, device without it refused", func(t *testing.T) {
		b3 := newTestBlock(t, r.mem, r.host, BlockConfig{Path: img, NoDiscard: true})
		err := b3.RestoreState(s)
		assert.ErrorContains(t, err, "driver accepted features")
	})
	t.Run("truncated state refused", func(t *testing.T) {
		b3 := newTestBlock(t, r.mem, r.host, BlockConfig{Path: img})
		bad := s
		bad.Data = s.Data[:len(s.Data)-3]
		assert.Error(t, b3.RestoreState(bad))
	})
	t.Run("save needs quiesce", func(t *testing.T) {
		_, err := b2.SaveState()
		assert.Error(t, err)
	})
}

func TestRestoreRefusesForgedConfigSpace(t *testing.T) {
	r := newBlkRig(t, BlockConfig{})
	require.NoError(t, r.blk.Quiesce(context.Background()))
	s, err := r.blk.SaveState()
	require.NoError(t, err)
	// The config space blob follows 1+4+4+8+2+2+1+1+1 bytes of registers
	// and its 4-byte length.
	const cfgAt = 24 + 4
	for name, tt := range map[string]struct {
		patch func(d []byte)
		msg   string
	}{
		"device id":     {func(d []byte) { d[cfgAt+2] ^= 1 }, "config space byte 0x2"},
		"unaligned bar": {func(d []byte) { d[cfgAt+0x10] |= 0x10 }, "bar 0 value"},
		"capability":    {func(d []byte) { d[cfgAt+0x41] = 0xf0 }, "config space byte 0x41"},
	} {
		t.Run(name, func(t *testing.T) {
			bad := s
			bad.Data = append([]byte(nil), s.Data...)
			tt.patch(bad.Data)
			b2 := newTestBlock(t, r.mem, r.host, BlockConfig{})
			assert.ErrorContains(t, b2.RestoreState(bad), tt.msg)
		})
	}
}
