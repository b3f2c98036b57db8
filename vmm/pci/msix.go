package pci

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// MSI-X (PCI Local Bus spec 3.0, §6.8.2).
const (
	msixEntrySize    = 16
	msixCtrlEnable   = 1 << 15
	msixCtrlFuncMask = 1 << 14
	msixVectorMasked = 1

	// NoVector is virtio's VIRTIO_MSI_NO_VECTOR: no interrupt wanted.
	NoVector = 0xffff
)

// MSIXTable is an MSI-X capability, its vector table and its pending-bit
// array. The device maps the table and the PBA inside one of its BARs and
// forwards accesses there to ReadTable/WriteTable and ReadPBA.
type MSIXTable struct {
	cfg    *ConfigSpace
	capOff int
	host   Host

	mu      sync.Mutex // guards entries and pending
	entries [][4]uint32
	pending []uint64
}

// NewMSIXTable adds an MSI-X capability for n vectors to cfg; the table
// lives at tableOff and the PBA at pbaOff inside BAR bar.
func NewMSIXTable(cfg *ConfigSpace, host Host, n int, bar int, tableOff, pbaOff uint32) (*MSIXTable, error) {
	if n < 1 || n > 2048 {
		return nil, fmt.Errorf("pci: msi-x: %d vectors", n)
	}
	body := make([]byte, 10)
	binary.LittleEndian.PutUint16(body[0:], uint16(n-1))
	binary.LittleEndian.PutUint32(body[2:], tableOff|uint32(bar))
	binary.LittleEndian.PutUint32(body[6:], pbaOff|uint32(bar))
	writable := make([]byte, 10)
	writable[1] = (msixCtrlEnable | msixCtrlFuncMask) >> 8
	off, err := cfg.AddCapability(CapMSIX, body, writable)
	if err != nil {
		return nil, err
	}
	t := &MSIXTable{cfg: cfg, capOff: off, host: host,
		entries: make([][4]uint32, n), pending: make([]uint64, (n+63)/64)}
	for i := range t.entries {
		t.entries[i][3] = msixVectorMasked // masked at reset
	}
	return t, nil
}

// TableSize is the byte size of the vector table.
func (t *MSIXTable) TableSize() uint64 { return uint64(len(t.entries)) * msixEntrySize }

// PBASize is the byte size of the pending-bit array.
func (t *MSIXTable) PBASize() uint64 { return uint64(len(t.pending)) * 8 }

// Vectors is the number of vectors.
func (t *MSIXTable) Vectors() int { return len(t.entries) }

func (t *MSIXTable) control() uint16 { return t.cfg.Uint16(t.capOff + 2) }

// Enabled reports whether the guest enabled MSI-X.
func (t *MSIXTable) Enabled() bool { return t.control()&msixCtrlEnable != 0 }

// ReadTable serves a guest read at off inside the table.
func (t *MSIXTable) ReadTable(off uint64, data []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range data {
		o := off + uint64(i)
		e := o / msixEntrySize
		if e >= uint64(len(t.entries)) {
			data[i] = 0xff
			continue
		}
		w := t.entries[e][(o%msixEntrySize)/4]
		data[i] = byte(w >> (8 * (o % 4)))
	}
}

// WriteTable serves a guest write at off inside the table. Unmasking a
// vector with its pending bit set delivers the interrupt.
func (t *MSIXTable) WriteTable(off uint64, data []byte) {
	t.mu.Lock()
	var fire []int
	for i, b := range data {
		o := off + uint64(i)
		e := o / msixEntrySize
		if e >= uint64(len(t.entries)) {
			continue
		}
		word := &t.entries[e][(o%msixEntrySize)/4]
		sh := 8 * (o % 4)
		*word = *word&^(0xff<<sh) | uint32(b)<<sh
		if (o%msixEntrySize)/4 == 3 {
			*word &= msixVectorMasked // only the mask bit is writable
		}
	}
	fire = t.takeDeliverableLocked()
	t.mu.Unlock()
	t.deliver(fire)
}

// ReadPBA serves a guest read at off inside the pending-bit array.
func (t *MSIXTable) ReadPBA(off uint64, data []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for i := range data {
		o := off + uint64(i)
		if o/8 >= uint64(len(t.pending)) {
			data[i] = 0
			continue
		}
		data[i] = byte(t.pending[o/8] >> (8 * (o % 8)))
	}
}

// ConfigChanged must be called after a guest write to config space: clearing
// the function mask delivers pending vectors.
func (t *MSIXTable) ConfigChanged() {
	t.mu.Lock()
	fire := t.takeDeliverableLocked()
	t.mu.Unlock()
	t.deliver(fire)
}

// Notify raises vector v. A masked vector (or function) records a pending
// bit instead. It returns false when MSI-X is disabled or v is out of
// range (NoVector included), so the caller can fall back to INTx or drop.
func (t *MSIXTable) Notify(v uint16) (bool, error) {
	ctrl := t.control()
	if ctrl&msixCtrlEnable == 0 || int(v) >= len(t.entries) {
		return false, nil
	}
	t.mu.Lock()
	e := t.entries[v]
	if ctrl&msixCtrlFuncMask != 0 || e[3]&msixVectorMasked != 0 {
		t.pending[v/64] |= 1 << (v % 64)
		t.mu.Unlock()
		return true, nil
	}
	t.mu.Unlock()
	return true, t.host.SendMSI(uint64(e[0])|uint64(e[1])<<32, e[2])
}

func (t *MSIXTable) takeDeliverableLocked() []int {
	ctrl := t.control()
	if ctrl&msixCtrlEnable == 0 || ctrl&msixCtrlFuncMask != 0 {
		return nil
	}
	var fire []int
	for v := range t.entries {
		if t.pending[v/64]&(1<<(v%64)) != 0 && t.entries[v][3]&msixVectorMasked == 0 {
			t.pending[v/64] &^= 1 << (v % 64)
			fire = append(fire, v)
		}
	}
	return fire
}

func (t *MSIXTable) deliver(vs []int) {
	for _, v := range vs {
		t.mu.Lock()
		e := t.entries[v]
		t.mu.Unlock()
		// A failed injection has nowhere to be reported from a guest
		// access; the next Notify reports the same failure.
		_ = t.host.SendMSI(uint64(e[0])|uint64(e[1])<<32, e[2])
	}
}

// MSIXState is the table's state for snapshots.
type MSIXState struct {
	Entries [][4]uint32
	Pending []uint64
}

// Save returns the table's state (the capability bits live in config space).
func (t *MSIXTable) Save() MSIXState {
	t.mu.Lock()
	defer t.mu.Unlock()
	return MSIXState{
		Entries: append([][4]uint32(nil), t.entries...),
		Pending: append([]uint64(nil), t.pending...),
	}
}

// Restore replaces the table's state.
func (t *MSIXTable) Restore(s MSIXState) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(s.Entries) != len(t.entries) || len(s.Pending) != len(t.pending) {
		return fmt.Errorf("pci: msi-x state has %d vectors, device has %d", len(s.Entries), len(t.entries))
	}
	copy(t.entries, s.Entries)
	copy(t.pending, s.Pending)
	return nil
}
