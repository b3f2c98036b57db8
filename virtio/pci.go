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
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"

	"golang.org/x/sys/unix"

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
	// saveDevice encodes the device type's own part of the state (its
	// configuration); checkDevice refuses a saved part this device does
	// not match.
	saveDevice() []byte
	checkDevice(saved []byte) error
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
