package virtio

// The common configuration registers (virtio 1.x §4.1.4.3): how the
// driver reads and writes them, device status and reset. Everything here
// is called with transport.mu held, from vCPU threads (ReadBAR, WriteBAR)
// or, for resetLocked, at construction.

import (
	"encoding/binary"
	"fmt"

	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
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
