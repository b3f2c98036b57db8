package virtio

// The virtio-pci modern transport (virtio 1.x §4.1), shared by every device
// type in this package.
//
// Who owns what:
//
//   - vCPU threads call ReadBAR, WriteBAR and BARMapped. They take
//     transport.mu for every register access and never wait on I/O, with
//     one exception: a device reset (status 0) waits for the request in
//     progress to finish, so that no stale request writes guest memory
//     after the driver sees status 0.
//   - One worker goroutine per device (run) waits on one eventfd per queue
//     plus a stop eventfd. A guest notification reaches it either directly
//     from KVM (ioeventfd, no exit to userspace) or from WriteBAR on the
//     notify region, which writes the same eventfd. The worker alone walks
//     the rings and touches guest memory; it holds no lock while doing so,
//     but counts itself in transport.busy, which Quiesce and reset wait to
//     fall to zero.
//   - Backends (virtio-net receive) run their own goroutines; they never
//     touch guest memory, they queue a copy of the frame and kick the
//     worker.
//   - The machine calls Quiesce/SaveState/RestoreState/Resume (Stateful).
//
// Queue layout registers change only while the driver has not set
// DRIVER_OK (the worker does not run then) or under reset/restore (the
// worker is stopped and busy is zero), so the worker may read them without
// the lock once it has entered through begin.
//
// Lock order: transport.mu, then the pci.ConfigSpace and pci.MSIXTable
// mutexes. Device-specific locks (Net.rxMu) are leaves: nothing else is
// taken while holding them.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"golang.org/x/sys/unix"

	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
)

// Device status bits (§2.1).
const (
	StatusAcknowledge      = 1
	StatusDriver           = 2
	StatusDriverOK         = 4
	StatusFeaturesOK       = 8
	StatusDeviceNeedsReset = 0x40
	StatusFailed           = 0x80
)

// Transport feature bits (§6).
const (
	FeatureIndirectDesc = 1 << 28 // VIRTIO_F_INDIRECT_DESC
	FeatureVersion1     = 1 << 32 // VIRTIO_F_VERSION_1
)

// ISR bits (§4.1.4.5).
const (
	isrQueue  = 1
	isrConfig = 2
)

// virtio_pci_cap cfg_type values (§4.1.4).
const (
	capCommonCfg = 1
	capNotifyCfg = 2
	capISRCfg    = 3
	capDeviceCfg = 4
)

// BAR 0 layout. Each region sits in its own part of the BAR; the MSI-X
// table and PBA get their own 2 KiB each.
const (
	barSize         = 0x4000
	commonOff       = 0x0000
	commonSize      = 0x38 // through queue_device (virtio 1.0/1.1 layout)
	isrOff          = 0x0800
	isrSize         = 4
	deviceOff       = 0x1000
	deviceMax       = 0x1000
	notifyOff       = 0x2000
	notifyMult      = 4 // queue_notify_off * 4: every queue its own address
	msixTableOff    = 0x3000
	msixPBAOff      = 0x3800
	pciVendorRedHat = 0x1af4
)

// Common configuration register offsets (§4.1.4.3).
const (
	regDeviceFeatureSel = 0x00
	regDeviceFeature    = 0x04
	regDriverFeatureSel = 0x08
	regDriverFeature    = 0x0c
	regConfigMSIX       = 0x10
	regNumQueues        = 0x12
	regDeviceStatus     = 0x14
	regConfigGen        = 0x15
	regQueueSelect      = 0x16
	regQueueSize        = 0x18
	regQueueMSIX        = 0x1a
	regQueueEnable      = 0x1c
	regQueueNotifyOff   = 0x1e
	regQueueDescLo      = 0x20
	regQueueDescHi      = 0x24
	regQueueDriverLo    = 0x28
	regQueueDriverHi    = 0x2c
	regQueueDeviceLo    = 0x30
	regQueueDeviceHi    = 0x34
)

// commonRegs lists every register as (offset, width), so that an access
// of any size at any offset is split into register reads and
// read-modify-writes. 64-bit addresses are two 32-bit halves, which is how
// Linux writes them (vp_iowrite64_twopart).
var commonRegs = [...]struct{ off, size int }{
	{regDeviceFeatureSel, 4}, {regDeviceFeature, 4}, {regDriverFeatureSel, 4},
	{regDriverFeature, 4}, {regConfigMSIX, 2}, {regNumQueues, 2},
	{regDeviceStatus, 1}, {regConfigGen, 1}, {regQueueSelect, 2},
	{regQueueSize, 2}, {regQueueMSIX, 2}, {regQueueEnable, 2},
	{regQueueNotifyOff, 2}, {regQueueDescLo, 4}, {regQueueDescHi, 4},
	{regQueueDriverLo, 4}, {regQueueDriverHi, 4}, {regQueueDeviceLo, 4},
	{regQueueDeviceHi, 4},
}

// deviceOps is what a device type plugs into the transport.
type deviceOps interface {
	kind() string          // state Kind, e.g. "virtio-blk"
	deviceType() uint16    // virtio device ID: 1 net, 2 blk
	class() (uint8, uint8) // PCI class, subclass
	features() uint64      // offered, transport bits included
	// checkFeatures reports whether the accepted set obeys the device's
	// dependency rules (the transport checks subset and VERSION_1).
	checkFeatures(accepted uint64) bool
	numQueues() int
	configSize() int
	readConfig(off int, data []byte)  // called with transport.mu held
	writeConfig(off int, data []byte) // called with transport.mu held
	// activate is called on DRIVER_OK with transport.mu held.
	activate(accepted uint64)
	// process handles at most one request on queue q. It returns whether
	// it made progress; an error (a *ChainError) breaks the device.
	// Called on the worker, between begin and end.
	process(q int) (bool, error)
	// reset returns device-specific state to power-on; the worker is idle.
	reset()
	saveDevice(e *devstate.Encoder)
	restoreDevice(d *devstate.Decoder) error
}

// vqueue is one queue's transport registers and its ring state.
type vqueue struct {
	size    uint16
	enabled bool
	vector  uint16
	desc    uint64
	driver  uint64
	device  uint64
	ring    *Queue // non-nil once enabled
}

// transport is the virtio-pci function shared by all device types.
type transport struct {
	name   string
	mem    *guestmem.Memory
	host   pci.Host
	dev    deviceOps
	log    *slog.Logger
	cfg    *pci.ConfigSpace
	msix   *pci.MSIXTable
	useIOE bool

	efds   []int // one kick eventfd per queue; fixed after construction
	stopFD int   // wakes the worker to exit
	wg     sync.WaitGroup

	// mu guards everything below, and cond (on mu) signals busy reaching
	// zero.
	mu             sync.Mutex
	cond           *sync.Cond
	status         uint8
	devFeatSel     uint32
	drvFeatSel     uint32
	drvFeatures    uint64
	configVector   uint16
	queueSel       uint16
	configGen      uint8
	isr            uint8
	broken         bool // a malformed ring; cleared by reset
	paused         bool // quiesced
	closed         bool
	busy           int // goroutines between begin and end
	queues         []*vqueue
	barAddr        uint64 // BAR 0 as last reported by BARMapped
	ioeAddrs       []uint64
	intxAsserted   bool
	warnedFeatures bool
}

var (
	_ pci.Device    = (*transport)(nil)
	_ pci.BARMapper = (*transport)(nil)
)

func newTransport(name string, mem *guestmem.Memory, host pci.Host, dev deviceOps, useIOE bool, log *slog.Logger) (_ *transport, err error) {
	if mem == nil || host == nil {
		return nil, fmt.Errorf("%s: nil guest memory or host", name)
	}
	if log == nil {
		log = slog.Default()
	}
	class, sub := dev.class()
	cfg, err := pci.NewConfigSpace(pci.Identity{
		VendorID:    pciVendorRedHat,
		DeviceID:    0x1040 + dev.deviceType(),
		SubVendorID: pciVendorRedHat,
		SubsystemID: 0x1040 + dev.deviceType(),
		Revision:    1,
		Class:       class,
		Subclass:    sub,
	}, []pci.BAR{{Index: 0, Kind: pci.BARMem64, Size: barSize}})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	nq := dev.numQueues()
	caps := []struct {
		typ        uint8
		off, len   uint32
		multiplier bool
	}{
		{capCommonCfg, commonOff, commonSize, false},
		{capNotifyCfg, notifyOff, uint32(notifyMult * nq), true},
		{capISRCfg, isrOff, isrSize, false},
		{capDeviceCfg, deviceOff, uint32(dev.configSize()), false},
	}
	for _, c := range caps {
		// struct virtio_pci_cap after cap_vndr and cap_next (§4.1.4).
		body := make([]byte, 14)
		body[0] = 16 // cap_len
		body[1] = c.typ
		body[2] = 0 // bar
		binary.LittleEndian.PutUint32(body[6:], c.off)
		binary.LittleEndian.PutUint32(body[10:], c.len)
		if c.multiplier {
			body[0] = 20
			body = binary.LittleEndian.AppendUint32(body, notifyMult)
		}
		if _, err := cfg.AddCapability(pci.CapVendor, body, nil); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	// One vector per queue plus one for configuration changes.
	msix, err := pci.NewMSIXTable(cfg, host, nq+1, 0, msixTableOff, msixPBAOff)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	t := &transport{name: name, mem: mem, host: host, dev: dev, log: log.With("device", name),
		cfg: cfg, msix: msix, useIOE: useIOE, stopFD: -1}
	t.cond = sync.NewCond(&t.mu)
	ok := false
	defer func() {
		if !ok {
			t.closeFDs()
		}
	}()
	for range nq {
		fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("%s: create queue eventfd: %w", name, err)
		}
		t.efds = append(t.efds, fd)
		t.queues = append(t.queues, &vqueue{})
	}
	if t.stopFD, err = unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC); err != nil {
		return nil, fmt.Errorf("%s: create stop eventfd: %w", name, err)
	}
	t.resetLocked()
	ok = true
	t.wg.Add(1)
	go t.run()
	return t, nil
}

func (t *transport) closeFDs() {
	for i, fd := range t.efds {
		if fd >= 0 {
			unix.Close(fd)
			t.efds[i] = -1
		}
	}
	if t.stopFD >= 0 {
		unix.Close(t.stopFD)
		t.stopFD = -1
	}
}

// close stops the worker, withdraws the ioeventfds and closes the
// eventfds. Idempotent.
func (t *transport) close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	t.unregisterIOEventsLocked()
	t.mu.Unlock()
	signal(t.stopFD)
	t.wg.Wait()
	t.closeFDs()
}

func signal(fd int) {
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(fd, one[:]) // EAGAIN: the counter is already non-zero
}

// Name implements pci.Device.
func (t *transport) Name() string { return t.name }

// Config implements pci.Device.
func (t *transport) Config() *pci.ConfigSpace { return t.cfg }

// ReadBAR implements pci.Device.
func (t *transport) ReadBAR(bar int, off uint64, data []byte) {
	clear(data)
	if bar != 0 || off >= barSize || uint64(len(data)) > barSize-off {
		return
	}
	switch {
	case off < commonOff+commonSize:
		t.mu.Lock()
		t.readCommonLocked(int(off), data)
		t.mu.Unlock()
	case off >= isrOff && off < isrOff+isrSize:
		t.mu.Lock()
		if off == isrOff {
			data[0] = t.isr
			t.isr = 0 // read-to-clear (§4.1.4.5), which deasserts INTx
			t.updateINTxLocked()
		}
		t.mu.Unlock()
	case off >= deviceOff && off < deviceOff+deviceMax:
		o := int(off - deviceOff)
		if o < t.dev.configSize() {
			t.mu.Lock()
			t.dev.readConfig(o, data)
			t.mu.Unlock()
		}
	case off >= msixTableOff && off < msixTableOff+t.msix.TableSize():
		t.msix.ReadTable(off-msixTableOff, data)
	case off >= msixPBAOff && off < msixPBAOff+t.msix.PBASize():
		t.msix.ReadPBA(off-msixPBAOff, data)
	}
}

// WriteBAR implements pci.Device.
func (t *transport) WriteBAR(bar int, off uint64, data []byte) {
	if bar != 0 || off >= barSize || uint64(len(data)) > barSize-off {
		return
	}
	switch {
	case off < commonOff+commonSize:
		t.mu.Lock()
		t.writeCommonLocked(int(off), data)
		t.mu.Unlock()
	case off >= deviceOff && off < deviceOff+deviceMax:
		o := int(off - deviceOff)
		if o < t.dev.configSize() {
			t.mu.Lock()
			t.dev.writeConfig(o, data)
			t.mu.Unlock()
		}
	case off >= notifyOff && off < notifyOff+uint64(notifyMult*len(t.queues)):
		// The value written is the queue index; the address already says
		// which queue, and that is what we trust.
		t.mu.Lock()
		closed := t.closed
		t.mu.Unlock()
		if !closed {
			signal(t.efds[(off-notifyOff)/notifyMult])
		}
	case off >= msixTableOff && off < msixTableOff+t.msix.TableSize():
		t.msix.WriteTable(off-msixTableOff, data)
	}
}

// ConfigChanged must be called by the host bridge after every guest write
// to configuration space. The MSI-X function mask or enable bit and the
// command register's INTx-disable bit may have changed: pending MSI-X
// vectors are delivered and the INTx line is brought in line.
func (t *transport) ConfigChanged() {
	t.msix.ConfigChanged()
	t.mu.Lock()
	t.updateINTxLocked()
	t.mu.Unlock()
}

// BARMapped implements pci.BARMapper: the host bridge reports where BAR 0
// now decodes (0: not at all). With ioeventfds enabled, each queue's
// notify address is registered with KVM so that a kick signals the
// worker without leaving the kernel.
func (t *transport) BARMapped(bar int, addr uint64) {
	if bar != 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	t.unregisterIOEventsLocked()
	t.barAddr = addr
	if !t.useIOE || addr == 0 {
		return
	}
	for i, fd := range t.efds {
		a := addr + notifyOff + uint64(notifyMult*i)
		if err := t.host.AddIOEvent(a, 2, fd); err != nil {
			// Kicks still arrive as MMIO exits through WriteBAR.
			t.log.Warn("ioeventfd not registered; notifications exit to userspace",
				"queue", i, "gpa", fmt.Sprintf("%#x", a), "err", err)
			continue
		}
		t.ioeAddrs = append(t.ioeAddrs, a)
	}
}

func (t *transport) unregisterIOEventsLocked() {
	for _, a := range t.ioeAddrs {
		i := int(a-t.barAddr-notifyOff) / notifyMult
		if err := t.host.RemoveIOEvent(a, 2, t.efds[i]); err != nil {
			t.log.Warn("remove ioeventfd", "gpa", fmt.Sprintf("%#x", a), "err", err)
		}
	}
	t.ioeAddrs = nil
}

// readCommonLocked serves a read of the common configuration.
func (t *transport) readCommonLocked(off int, data []byte) {
	img := t.commonImageLocked()
	for i := range data {
		if off+i < commonSize {
			data[i] = img[off+i]
		}
	}
}

// commonImageLocked renders the common configuration registers as the
// driver would read them now.
func (t *transport) commonImageLocked() [commonSize]byte {
	var b [commonSize]byte
	le := binary.LittleEndian
	le.PutUint32(b[regDeviceFeatureSel:], t.devFeatSel)
	if t.devFeatSel < 2 {
		le.PutUint32(b[regDeviceFeature:], uint32(t.dev.features()>>(32*t.devFeatSel)))
	}
	le.PutUint32(b[regDriverFeatureSel:], t.drvFeatSel)
	if t.drvFeatSel < 2 {
		le.PutUint32(b[regDriverFeature:], uint32(t.drvFeatures>>(32*t.drvFeatSel)))
	}
	le.PutUint16(b[regConfigMSIX:], t.configVector)
	le.PutUint16(b[regNumQueues:], uint16(len(t.queues)))
	b[regDeviceStatus] = t.status
	b[regConfigGen] = t.configGen
	le.PutUint16(b[regQueueSelect:], t.queueSel)
	if q := t.selectedLocked(); q != nil {
		le.PutUint16(b[regQueueSize:], q.size)
		le.PutUint16(b[regQueueMSIX:], q.vector)
		if q.enabled {
			le.PutUint16(b[regQueueEnable:], 1)
		}
		le.PutUint16(b[regQueueNotifyOff:], t.queueSel)
		le.PutUint64(b[regQueueDescLo:], q.desc)
		le.PutUint64(b[regQueueDriverLo:], q.driver)
		le.PutUint64(b[regQueueDeviceLo:], q.device)
	}
	return b
}

func (t *transport) selectedLocked() *vqueue {
	if int(t.queueSel) < len(t.queues) {
		return t.queues[t.queueSel]
	}
	return nil
}

// writeCommonLocked splits a write into per-register read-modify-writes.
func (t *transport) writeCommonLocked(off int, data []byte) {
	end := off + len(data)
	for _, r := range commonRegs {
		if r.off+r.size <= off || r.off >= end {
			continue
		}
		img := t.commonImageLocked()
		for i := max(off, r.off); i < min(end, r.off+r.size); i++ {
			img[i] = data[i-off]
		}
		var v uint64
		for i := r.size - 1; i >= 0; i-- {
			v = v<<8 | uint64(img[r.off+i])
		}
		t.setRegLocked(r.off, v)
	}
}

func setHalf(v *uint64, hi bool, x uint64) {
	if hi {
		*v = *v&0xffffffff | x<<32
	} else {
		*v = *v&^0xffffffff | x
	}
}

func (t *transport) setRegLocked(reg int, v uint64) {
	q := t.selectedLocked()
	// Queue layout is frozen while the queue is enabled or the device
	// runs; a driver that writes it anyway is ignored.
	qWritable := q != nil && !q.enabled && t.status&StatusDriverOK == 0
	switch reg {
	case regDeviceFeatureSel:
		t.devFeatSel = uint32(v)
	case regDriverFeatureSel:
		t.drvFeatSel = uint32(v)
	case regDriverFeature:
		if t.drvFeatSel < 2 && t.status&StatusFeaturesOK == 0 {
			sh := 32 * t.drvFeatSel
			t.drvFeatures = t.drvFeatures&^(0xffffffff<<sh) | v<<sh
		}
	case regConfigMSIX:
		t.configVector = t.vectorOrNone(uint16(v))
	case regDeviceStatus:
		t.setStatusLocked(uint8(v))
	case regQueueSelect:
		t.queueSel = uint16(v)
	case regQueueSize:
		if qWritable {
			q.size = uint16(v)
		}
	case regQueueMSIX:
		if q != nil {
			q.vector = t.vectorOrNone(uint16(v))
		}
	case regQueueEnable:
		if qWritable && v == 1 {
			t.enableQueueLocked(q)
		}
	case regQueueDescLo, regQueueDescHi:
		if qWritable {
			setHalf(&q.desc, reg == regQueueDescHi, v)
		}
	case regQueueDriverLo, regQueueDriverHi:
		if qWritable {
			setHalf(&q.driver, reg == regQueueDriverHi, v)
		}
	case regQueueDeviceLo, regQueueDeviceHi:
		if qWritable {
			setHalf(&q.device, reg == regQueueDeviceHi, v)
		}
	}
}

// vectorOrNone maps a vector the table does not have to NO_VECTOR, which
// is how the device tells the driver it cannot use it (§4.1.5.1.2).
func (t *transport) vectorOrNone(v uint16) uint16 {
	if int(v) >= t.msix.Vectors() {
		return pci.NoVector
	}
	return v
}

func (t *transport) enableQueueLocked(q *vqueue) {
	ring := NewQueue(t.mem, q.size, guestmem.GPA(q.desc), guestmem.GPA(q.driver), guestmem.GPA(q.device))
	if err := ring.Check(); err != nil {
		t.failLocked(err)
		return
	}
	q.ring = ring
	q.enabled = true
}

// setStatusLocked applies a driver write to device_status (§2.1, §3.1).
func (t *transport) setStatusLocked(v uint8) {
	if v == 0 {
		t.resetDeviceLocked()
		return
	}
	old := t.status
	v |= old & StatusDeviceNeedsReset // only reset clears it
	if v&StatusFeaturesOK != 0 && old&StatusFeaturesOK == 0 {
		offered := t.dev.features()
		f := t.drvFeatures
		if f&^offered != 0 || f&FeatureVersion1 == 0 || !t.dev.checkFeatures(f) {
			// The driver reads status back and sees FEATURES_OK unset.
			v &^= StatusFeaturesOK
			if !t.warnedFeatures {
				t.warnedFeatures = true
				t.log.Warn("driver feature set refused", "accepted", fmt.Sprintf("%#x", f),
					"offered", fmt.Sprintf("%#x", offered))
			}
		}
	}
	if v&StatusDriverOK != 0 && old&StatusDriverOK == 0 {
		if v&StatusFeaturesOK == 0 {
			v &^= StatusDriverOK
		} else {
			t.status = v
			t.dev.activate(t.drvFeatures)
			// Buffers posted before DRIVER_OK are looked at now.
			for _, fd := range t.efds {
				signal(fd)
			}
			return
		}
	}
	t.status = v
}

// resetDeviceLocked is a driver-initiated reset: stop taking requests,
// wait for the one in progress, and return to power-on state.
func (t *transport) resetDeviceLocked() {
	t.status = 0
	for t.busy > 0 {
		t.cond.Wait()
	}
	t.resetLocked()
	t.dev.reset()
}

// resetLocked returns the transport registers to power-on state.
func (t *transport) resetLocked() {
	t.status = 0
	t.devFeatSel, t.drvFeatSel, t.drvFeatures = 0, 0, 0
	t.configVector = pci.NoVector
	t.queueSel = 0
	t.isr = 0
	t.broken = false
	t.warnedFeatures = false
	for _, q := range t.queues {
		*q = vqueue{size: MaxQueueSize, vector: pci.NoVector}
	}
	t.updateINTxLocked()
}

// failLocked marks the device broken after a malformed ring: it stops
// processing, sets DEVICE_NEEDS_RESET and raises a configuration change
// interrupt (§2.1.2). Only a reset revives it.
func (t *transport) failLocked(err error) {
	if t.broken {
		return
	}
	t.broken = true
	t.status |= StatusDeviceNeedsReset
	t.log.Warn("malformed virtqueue; device needs reset", "err", err)
	t.configInterruptLocked()
}

func (t *transport) fail(err error) {
	t.mu.Lock()
	t.failLocked(err)
	t.mu.Unlock()
}

// configInterruptLocked signals a configuration change (§4.1.5.3).
func (t *transport) configInterruptLocked() {
	t.isr |= isrConfig
	if t.msix.Enabled() {
		if _, err := t.msix.Notify(t.configVector); err != nil {
			t.log.Warn("send config msi", "err", err)
		}
		return
	}
	t.updateINTxLocked()
}

// queueInterruptLocked signals used buffers on queue i (§4.1.5.2).
func (t *transport) queueInterruptLocked(i int) {
	if t.msix.Enabled() {
		// With MSI-X, NO_VECTOR means the driver wants no interrupt.
		if _, err := t.msix.Notify(t.queues[i].vector); err != nil {
			t.log.Warn("send queue msi", "queue", i, "err", err)
		}
		return
	}
	t.isr |= isrQueue
	t.updateINTxLocked()
}

// updateINTxLocked drives the INTx line to match the ISR: asserted while
// any ISR bit is set, MSI-X is off and the command register allows INTx.
func (t *transport) updateINTxLocked() {
	want := t.isr != 0 && !t.msix.Enabled() && t.cfg.Uint16(pci.RegCommand)&pci.CommandIntxDisable == 0
	if want == t.intxAsserted {
		return
	}
	var gsi [1]byte
	t.cfg.Read(pci.RegInterruptLn, gsi[:])
	if err := t.host.SetIRQLine(uint32(gsi[0]), want); err != nil {
		t.log.Warn("set intx line", "gsi", gsi[0], "level", want, "err", err)
		return
	}
	t.intxAsserted = want
}

// begin admits the calling goroutine to device processing: false when the
// driver is not running, the device is broken, quiesced or closed.
func (t *transport) begin() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.runnableLocked() {
		return false
	}
	t.busy++
	return true
}

func (t *transport) runnableLocked() bool {
	return t.status&StatusDriverOK != 0 && !t.broken && !t.paused && !t.closed
}

func (t *transport) end() {
	t.mu.Lock()
	t.busy--
	if t.busy == 0 {
		t.cond.Broadcast()
	}
	t.mu.Unlock()
}

// run is the worker: it waits for queue kicks and services the queues.
func (t *transport) run() {
	defer t.wg.Done()
	fds := make([]unix.PollFd, len(t.queues)+1)
	for i, fd := range t.efds {
		fds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	fds[len(t.queues)] = unix.PollFd{Fd: int32(t.stopFD), Events: unix.POLLIN}
	var buf [8]byte
	for {
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			t.log.Error("virtio worker stopped", "err", err)
			return
		}
		if fds[len(t.queues)].Revents != 0 {
			return
		}
		for i := range t.queues {
			if fds[i].Revents == 0 {
				continue
			}
			_, _ = unix.Read(int(fds[i].Fd), buf[:]) // clear the counter
			t.service(i)
		}
	}
}

// service processes queue i until it is empty, the device stops, or the
// machine quiesces it; requests are never split.
func (t *transport) service(i int) {
	if !t.begin() {
		return
	}
	defer t.end()
	t.mu.Lock()
	enabled := t.queues[i].enabled
	t.mu.Unlock()
	if !enabled {
		return
	}
	for {
		did, err := t.dev.process(i)
		if err != nil {
			t.fail(err)
			return
		}
		t.mu.Lock()
		if t.queues[i].ring.takeInterrupt() {
			t.queueInterruptLocked(i)
		}
		run := t.runnableLocked()
		t.mu.Unlock()
		if !did || !run {
			return
		}
	}
}

// kick asks the worker to look at queue i.
func (t *transport) kick(i int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		signal(t.efds[i])
	}
}

// ring returns queue i's ring for the worker (nil if not enabled).
func (t *transport) ring(i int) *Queue { return t.queues[i].ring }

// accepted returns the negotiated features.
func (t *transport) accepted() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.drvFeatures
}

// quiesce stops processing at a request boundary and waits for the
// request in progress (devstate.Stateful).
func (t *transport) quiesce(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.paused = true
	stop := context.AfterFunc(ctx, func() {
		t.mu.Lock()
		t.cond.Broadcast()
		t.mu.Unlock()
	})
	defer stop()
	for t.busy > 0 {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: quiesce: %w", t.name, err)
		}
		t.cond.Wait()
	}
	return nil
}

// resume restarts processing and looks at every queue again, since kicks
// that arrived while quiesced were consumed without effect.
func (t *transport) resume() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.paused = false
	t.intxAsserted = false
	t.updateINTxLocked()
	if t.closed {
		return
	}
	for _, fd := range t.efds {
		signal(fd)
	}
}

// Transport state, version 1. Order: registers, config space, MSI-X,
// queues, device blob.
const (
	stateVersion  = 1
	maxDeviceBlob = 4096
)

func (t *transport) save(id string) (devstate.State, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.busy > 0 || !t.paused {
		return devstate.State{}, fmt.Errorf("%s: save state: device not quiesced", t.name)
	}
	var e devstate.Encoder
	e.U8(t.status)
	e.U32(t.devFeatSel)
	e.U32(t.drvFeatSel)
	e.U64(t.drvFeatures)
	e.U16(t.configVector)
	e.U16(t.queueSel)
	e.U8(t.configGen)
	e.U8(t.isr)
	e.Bool(t.broken)
	snap := t.cfg.Snapshot()
	e.Blob(snap[:])
	ms := t.msix.Save()
	e.U32(uint32(len(ms.Entries)))
	for _, ent := range ms.Entries {
		for _, w := range ent {
			e.U32(w)
		}
	}
	e.U32(uint32(len(ms.Pending)))
	for _, p := range ms.Pending {
		e.U64(p)
	}
	e.U16(uint16(len(t.queues)))
	for _, q := range t.queues {
		e.U16(q.size)
		e.Bool(q.enabled)
		e.U16(q.vector)
		e.U64(q.desc)
		e.U64(q.driver)
		e.U64(q.device)
		var la, ui uint16
		if q.ring != nil {
			la, ui = q.ring.Indices()
		}
		e.U16(la)
		e.U16(ui)
	}
	var de devstate.Encoder
	t.dev.saveDevice(&de)
	e.Blob(de.Bytes())
	return devstate.State{ID: id, Kind: t.dev.kind(), Version: stateVersion, Data: e.Bytes()}, nil
}

// restore loads state saved by save onto a device built with the same
// configuration. The state is untrusted input: every field is checked and
// nothing changes unless all of it is valid. The device stays quiesced
// until Resume.
func (t *transport) restore(id string, s devstate.State) error {
	if s.ID != id || s.Kind != t.dev.kind() {
		return fmt.Errorf("%s: restore state of %s %q", t.name, s.Kind, s.ID)
	}
	if s.Version != stateVersion {
		return fmt.Errorf("%s: restore state version %d (want %d)", t.name, s.Version, stateVersion)
	}
	d := devstate.NewDecoder(s.Data)
	status := d.U8()
	devFeatSel := d.U32()
	drvFeatSel := d.U32()
	drvFeatures := d.U64()
	configVector := d.U16()
	queueSel := d.U16()
	configGen := d.U8()
	isr := d.U8()
	broken := d.Bool()
	snapb := d.Blob(pci.ConfigSize)
	nent := d.U32()
	if d.Err() == nil && int(nent) != t.msix.Vectors() {
		return fmt.Errorf("%s: restore state: %d msi-x vectors, device has %d", t.name, nent, t.msix.Vectors())
	}
	var ms pci.MSIXState
	for range t.msix.Vectors() {
		var ent [4]uint32
		for j := range ent {
			ent[j] = d.U32()
		}
		ms.Entries = append(ms.Entries, ent)
	}
	npend := d.U32()
	if d.Err() == nil && uint64(npend) != (uint64(t.msix.Vectors())+63)/64 {
		return fmt.Errorf("%s: restore state: %d msi-x pending words", t.name, npend)
	}
	for range npend {
		ms.Pending = append(ms.Pending, d.U64())
	}
	nq := d.U16()
	if d.Err() == nil && int(nq) != len(t.queues) {
		return fmt.Errorf("%s: restore state: %d queues, device has %d", t.name, nq, len(t.queues))
	}
	qs := make([]vqueue, len(t.queues))
	la := make([]uint16, len(t.queues))
	ui := make([]uint16, len(t.queues))
	for i := range qs {
		q := &qs[i]
		q.size = d.U16()
		q.enabled = d.Bool()
		q.vector = d.U16()
		q.desc, q.driver, q.device = d.U64(), d.U64(), d.U64()
		la[i], ui[i] = d.U16(), d.U16()
	}
	devBlob := d.Blob(maxDeviceBlob)
	if err := d.Done(); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	if len(snapb) != pci.ConfigSize {
		return fmt.Errorf("%s: restore state: config space of %d bytes", t.name, len(snapb))
	}
	if err := t.checkConfigSnapshot(snapb); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	for i := range qs {
		q := &qs[i]
		if q.enabled {
			q.ring = NewQueue(t.mem, q.size, guestmem.GPA(q.desc), guestmem.GPA(q.driver), guestmem.GPA(q.device))
			if err := q.ring.Check(); err != nil {
				return fmt.Errorf("%s: restore state: queue %d: %w", t.name, i, err)
			}
			if uint16(la[i]-ui[i]) > q.size {
				// The device cannot hold more chains than the ring has.
				return fmt.Errorf("%s: restore state: queue %d indices %d/%d", t.name, i, la[i], ui[i])
			}
			q.ring.SetIndices(la[i], ui[i])
		}
	}

	t.mu.Lock()
	defer t.mu.Unlock()
	if t.busy > 0 {
		return fmt.Errorf("%s: restore state: device busy", t.name)
	}
	if err := t.dev.restoreDevice(devstate.NewDecoder(devBlob)); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	if err := t.msix.Restore(ms); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	var snap [pci.ConfigSize]byte
	copy(snap[:], snapb)
	t.cfg.Restore(snap)
	t.paused = true
	t.status, t.devFeatSel, t.drvFeatSel, t.drvFeatures = status, devFeatSel, drvFeatSel, drvFeatures
	t.configVector, t.queueSel, t.configGen, t.isr, t.broken = t.vectorOrNone(configVector), queueSel, configGen, isr, broken
	for i, q := range t.queues {
		*q = qs[i]
		q.vector = t.vectorOrNone(q.vector)
	}
	if t.status&StatusDriverOK != 0 {
		t.dev.activate(t.drvFeatures)
	}
	return nil
}

// checkConfigSnapshot refuses a saved configuration space that differs
// from this device's in a byte the guest cannot write (identity,
// capabilities) or holds a BAR 0 value the guest could not have
// programmed. pci.ConfigSpace.Restore takes the bytes as they are.
func (t *transport) checkConfigSnapshot(snap []byte) error {
	cur := t.cfg.Snapshot()
	msixCtl := -1
	for p := int(cur[pci.RegCapPtr]); p != 0 && p+1 < pci.ConfigSize; p = int(cur[p+1]) {
		if cur[p] == pci.CapMSIX {
			msixCtl = p + 2
			break
		}
	}
	for i := range cur {
		switch {
		case i >= pci.RegCommand && i < pci.RegCommand+4, // command, status
			i >= pci.RegBAR0 && i < pci.RegBAR0+8,             // BAR 0, 64-bit
			i == pci.RegInterruptLn, i == pci.RegInterruptPin, // set by the host bridge at attach
			i == msixCtl || i == msixCtl+1:
			continue
		}
		if snap[i] != cur[i] {
			return fmt.Errorf("config space byte %#x is %#x, device has %#x", i, snap[i], cur[i])
		}
	}
	bar := binary.LittleEndian.Uint64(snap[pci.RegBAR0:])
	if bar&0xf != 4 || (bar&^0xf)%barSize != 0 {
		return fmt.Errorf("bar 0 value %#x", bar)
	}
	return nil
}
