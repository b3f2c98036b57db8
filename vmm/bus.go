package vmm

import (
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
)

// Device answers guest accesses to the range it was registered at; off is
// relative to that range. The calling vCPU waits, so never block on I/O.
type Device interface {
	Name() string
	Read(off uint64, data []byte)
	Write(off uint64, data []byte)
}

// ErrOverlap is returned by Bus.Register for a range that overlaps one
// already registered.
var ErrOverlap = errors.New("range overlaps a registered device")

type busEntry struct {
	base, size uint64
	dev        Device
}

// Bus routes guest accesses (port I/O or MMIO) to devices by address.
// Reads and writes may come from every vCPU at once.
type Bus struct {
	name string

	mu      sync.RWMutex
	entries []busEntry // sorted by base, non-overlapping

	// Unclaimed counts accesses that hit no device.
	Unclaimed atomic.Uint64
}

// NewBus returns an empty bus; name appears in errors ("pio", "mmio").
func NewBus(name string) *Bus { return &Bus{name: name} }

// Register claims [base, base+size) for dev.
func (b *Bus) Register(base, size uint64, dev Device) error {
	if size == 0 {
		return fmt.Errorf("%s bus: register %s: empty range", b.name, dev.Name())
	}
	if base+size < base {
		return fmt.Errorf("%s bus: register %s at %#x+%#x: range overflows", b.name, dev.Name(), base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range b.entries {
		if base < e.base+e.size && e.base < base+size {
			return fmt.Errorf("%s bus: register %s at %#x+%#x (taken by %s at %#x+%#x): %w",
				b.name, dev.Name(), base, size, e.dev.Name(), e.base, e.size, ErrOverlap)
		}
	}
	b.entries = append(b.entries, busEntry{base, size, dev})
	sort.Slice(b.entries, func(i, j int) bool { return b.entries[i].base < b.entries[j].base })
	return nil
}

// Unregister removes the registration of dev at base. It reports whether
// one was found.
func (b *Bus) Unregister(base uint64, dev Device) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, e := range b.entries {
		if e.base == base && e.dev == dev {
			b.entries = append(b.entries[:i], b.entries[i+1:]...)
			return true
		}
	}
	return false
}

func (b *Bus) find(addr uint64, n int) (busEntry, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	i := sort.Search(len(b.entries), func(i int) bool { return b.entries[i].base+b.entries[i].size > addr })
	if i < len(b.entries) {
		e := b.entries[i]
		if addr >= e.base && addr+uint64(n) <= e.base+e.size {
			return e, true
		}
	}
	return busEntry{}, false
}

// Read fills data from the device at addr. Unclaimed reads are all-ones.
func (b *Bus) Read(addr uint64, data []byte) {
	for i := range data {
		data[i] = 0xff
	}
	e, ok := b.find(addr, len(data))
	if !ok {
		b.Unclaimed.Add(1)
		return
	}
	e.dev.Read(addr-e.base, data)
}

// Write hands data to the device at addr. Unclaimed writes are dropped.
func (b *Bus) Write(addr uint64, data []byte) {
	e, ok := b.find(addr, len(data))
	if !ok {
		b.Unclaimed.Add(1)
		return
	}
	e.dev.Write(addr-e.base, data)
}
