package virtio

import (
	"context"
	"encoding/binary"
	"fmt"

	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
)

// The transport's part of the machine state: one explicit struct,
// transportState, captured under transport.mu at a cut, walked once (walk)
// for both encoding and decoding, checked whole against the device before
// anything changes, then applied. The device type adds its own part
// (deviceOps.saveDevice/checkDevice), carried as a blob inside.

// Transport state, version 1. Order: registers, config space, MSI-X,
// queues, device blob.
const (
	stateVersion  = 1
	maxDeviceBlob = 4096
	maxMSIXWords  = 2048 // table entries (MSI-X allows 2048 vectors)
	maxQueues     = 1024
)

// transportState is one virtio-pci function at a cut.
type transportState struct {
	Status                 uint8
	DevFeatSel, DrvFeatSel uint32
	DrvFeatures            uint64
	ConfigVector, QueueSel uint16
	ConfigGen, ISR         uint8
	Broken                 bool // a malformed ring; cleared by reset
	Config                 []byte
	MSIX                   pci.MSIXState
	Queues                 []queueState
	Device                 []byte // the device type's own part
}

// queueState is one queue's registers and the device's ring indices.
type queueState struct {
	Size                 uint16
	Enabled              bool
	Vector               uint16
	Desc, Driver, Device uint64
	LastAvail, UsedIdx   uint16 // 0 while the queue is not enabled
}

func (s *transportState) walk(c *devstate.Codec) {
	c.U8(&s.Status)
	c.U32(&s.DevFeatSel)
	c.U32(&s.DrvFeatSel)
	c.U64(&s.DrvFeatures)
	c.U16(&s.ConfigVector)
	c.U16(&s.QueueSel)
	c.U8(&s.ConfigGen)
	c.U8(&s.ISR)
	c.Bool(&s.Broken)
	c.Bytes(&s.Config, pci.ConfigSize)
	devstate.Slice32(c, &s.MSIX.Entries, maxMSIXWords, "msi-x entries")
	for i := range s.MSIX.Entries {
		for j := range s.MSIX.Entries[i] {
			c.U32(&s.MSIX.Entries[i][j])
		}
	}
	devstate.Slice32(c, &s.MSIX.Pending, maxMSIXWords/64, "msi-x pending words")
	for i := range s.MSIX.Pending {
		c.U64(&s.MSIX.Pending[i])
	}
	devstate.Slice16(c, &s.Queues, maxQueues, "queues")
	for i := range s.Queues {
		s.Queues[i].walk(c)
	}
	c.Bytes(&s.Device, maxDeviceBlob)
}

func (q *queueState) walk(c *devstate.Codec) {
	c.U16(&q.Size)
	c.Bool(&q.Enabled)
	c.U16(&q.Vector)
	c.U64(&q.Desc)
	c.U64(&q.Driver)
	c.U64(&q.Device)
	c.U16(&q.LastAvail)
	c.U16(&q.UsedIdx)
}

// StateID implements devstate.Stateful: the ID the device was built with.
func (t *transport) StateID() string { return t.name }

// StateKind implements devstate.Stateful.
func (t *transport) StateKind() string { return t.dev.kind() }

// Quiesce implements devstate.Stateful: it stops processing at a request
// boundary and waits for the request in progress. Requests still in the
// rings stay there until Resume.
func (t *transport) Quiesce(ctx context.Context) error {
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

// Resume implements devstate.Stateful: processing restarts and every
// queue is looked at again, since kicks that arrived while quiesced were
// consumed without effect.
func (t *transport) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.paused = false
	t.intxAsserted = false
	t.updateINTxLocked()
	if t.closed {
		return nil
	}
	for _, fd := range t.efds {
		signal(fd)
	}
	return nil
}

// SaveState implements devstate.Stateful; the device must be quiesced.
func (t *transport) SaveState() (devstate.State, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.busy > 0 || !t.paused {
		return devstate.State{}, fmt.Errorf("%s: save state: device not quiesced", t.name)
	}
	s := t.captureLocked()
	return devstate.State{ID: t.name, Kind: t.dev.kind(), Version: stateVersion, Data: devstate.Encode(s.walk)}, nil
}

// captureLocked fills a transportState from the live transport.
func (t *transport) captureLocked() transportState {
	cfg := t.cfg.Snapshot()
	s := transportState{
		Status: t.status, DevFeatSel: t.devFeatSel, DrvFeatSel: t.drvFeatSel, DrvFeatures: t.drvFeatures,
		ConfigVector: t.configVector, QueueSel: t.queueSel, ConfigGen: t.configGen, ISR: t.isr, Broken: t.broken,
		Config: cfg[:], MSIX: t.msix.Save(), Device: t.dev.saveDevice(),
	}
	for _, q := range t.queues {
		qs := queueState{Size: q.size, Enabled: q.enabled, Vector: q.vector, Desc: q.desc, Driver: q.driver, Device: q.device}
		if q.ring != nil {
			qs.LastAvail, qs.UsedIdx = q.ring.Indices()
		}
		s.Queues = append(s.Queues, qs)
	}
	return s
}

// RestoreState implements devstate.Stateful, onto a device built with the
// same configuration. The state is untrusted input: it is decoded and
// checked whole, and nothing changes unless all of it is valid. The
// device stays quiesced until Resume.
func (t *transport) RestoreState(st devstate.State) error {
	if st.ID != t.name || st.Kind != t.dev.kind() {
		return fmt.Errorf("%s: restore state of %s %q", t.name, st.Kind, st.ID)
	}
	if st.Version != stateVersion {
		return fmt.Errorf("%s: restore state version %d (want %d)", t.name, st.Version, stateVersion)
	}
	var s transportState
	if err := devstate.Decode(st.Data, s.walk); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	rings, err := t.check(&s)
	if err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.busy > 0 {
		return fmt.Errorf("%s: restore state: device busy", t.name)
	}
	if err := t.applyLocked(&s, rings); err != nil {
		return fmt.Errorf("%s: restore state: %w", t.name, err)
	}
	return nil
}

// check refuses a decoded state that does not fit this device, and
// builds the rings of the enabled queues (nil for the others).
func (t *transport) check(s *transportState) ([]*Queue, error) {
	if n := len(s.MSIX.Entries); n != t.msix.Vectors() {
		return nil, fmt.Errorf("%d msi-x vectors, device has %d", n, t.msix.Vectors())
	}
	if n := len(s.MSIX.Pending); n != (t.msix.Vectors()+63)/64 {
		return nil, fmt.Errorf("%d msi-x pending words", n)
	}
	if len(s.Queues) != len(t.queues) {
		return nil, fmt.Errorf("%d queues, device has %d", len(s.Queues), len(t.queues))
	}
	if len(s.Config) != pci.ConfigSize {
		return nil, fmt.Errorf("config space of %d bytes", len(s.Config))
	}
	if err := t.checkConfigSnapshot(s.Config); err != nil {
		return nil, err
	}
	if err := t.dev.checkDevice(s.Device); err != nil {
		return nil, err
	}
	if offered := t.dev.features(); s.Status&StatusFeaturesOK != 0 && s.DrvFeatures&^offered != 0 {
		// The guest would go on using a feature this device lacks (a disk
		// saved with discard, restored with nodiscard).
		return nil, fmt.Errorf("driver accepted features %#x, this device offers %#x", s.DrvFeatures, offered)
	}
	rings := make([]*Queue, len(s.Queues))
	for i, q := range s.Queues {
		if !q.Enabled {
			continue
		}
		r := NewQueue(t.mem, q.Size, guestmem.GPA(q.Desc), guestmem.GPA(q.Driver), guestmem.GPA(q.Device))
		if err := r.Check(); err != nil {
			return nil, fmt.Errorf("queue %d: %w", i, err)
		}
		if uint16(q.LastAvail-q.UsedIdx) > q.Size {
			// The device cannot hold more chains than the ring has.
			return nil, fmt.Errorf("queue %d indices %d/%d", i, q.LastAvail, q.UsedIdx)
		}
		r.SetIndices(q.LastAvail, q.UsedIdx)
		rings[i] = r
	}
	return rings, nil
}

// applyLocked puts a checked state into the transport.
func (t *transport) applyLocked(s *transportState, rings []*Queue) error {
	if err := t.msix.Restore(s.MSIX); err != nil {
		return err
	}
	var cfg [pci.ConfigSize]byte
	copy(cfg[:], s.Config)
	t.cfg.Restore(cfg)
	t.paused = true
	t.status, t.devFeatSel, t.drvFeatSel, t.drvFeatures = s.Status, s.DevFeatSel, s.DrvFeatSel, s.DrvFeatures
	t.configVector, t.queueSel = t.vectorOrNone(s.ConfigVector), s.QueueSel
	t.configGen, t.isr, t.broken = s.ConfigGen, s.ISR, s.Broken
	for i, q := range t.queues {
		qs := s.Queues[i]
		*q = vqueue{size: qs.Size, enabled: qs.Enabled, vector: t.vectorOrNone(qs.Vector),
			desc: qs.Desc, driver: qs.Driver, device: qs.Device, ring: rings[i]}
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
