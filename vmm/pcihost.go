package vmm

import (
	"encoding/binary"
	"fmt"
	"sync"

	"govmm/vmm/pci"
)

// PCI configuration mechanism #1: an address register at 0xcf8 and a
// data window at 0xcfc, one bus, function 0 of each slot.
const (
	PCIConfigBase = 0xcf8
	PCIConfigSize = 8

	pciMaxSlots = 32
	// pciFirstGSI is the IOAPIC pin of slot 1's INTA#; slots share pins
	// 16..23 round-robin.
	pciFirstGSI = 16
	pciNumGSIs  = 8
)

// PCIBus is the host bridge and bus 0. It assigns BARs as firmware would,
// maps enabled BARs on the MMIO bus and follows the guest when it moves
// them.
type PCIBus struct {
	mmio *Bus

	mu     sync.Mutex // guards every field below
	addr   uint32     // CONFIG_ADDRESS
	slots  [pciMaxSlots]pci.Device
	mapped [pciMaxSlots][pci.NumBARs]uint64 // current mapping, 0 = none
	window [pciMaxSlots][pci.NumBARs]*barWindow
	next   uint64 // BAR allocator cursor
}

var _ Device = (*PCIBus)(nil)

// NewPCIBus returns a bus holding just the host bridge at 00:00.0.
func NewPCIBus(mmio *Bus) (*PCIBus, error) {
	cfg, err := pci.NewConfigSpace(pci.Identity{
		VendorID: 0x8086, DeviceID: 0x29c0, // an Intel host bridge ID Linux knows
		Class: 0x06, Subclass: 0x00,
	}, nil)
	if err != nil {
		return nil, err
	}
	b := &PCIBus{mmio: mmio, next: PCIHoleStart}
	b.slots[0] = &hostBridge{cfg: cfg}
	return b, nil
}

type hostBridge struct{ cfg *pci.ConfigSpace }

func (h *hostBridge) Name() string                 { return "pci-host-bridge" }
func (h *hostBridge) Config() *pci.ConfigSpace     { return h.cfg }
func (h *hostBridge) ReadBAR(int, uint64, []byte)  {}
func (h *hostBridge) WriteBAR(int, uint64, []byte) {}

// Add places dev in the next free slot, assigns its BARs in the MMIO
// window, enables decoding, wires INTA# to a GSI and maps the BARs. It
// returns the slot and the GSI.
func (b *PCIBus) Add(dev pci.Device) (slot int, gsi uint32, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for slot = 1; slot < pciMaxSlots && b.slots[slot] != nil; slot++ {
	}
	if slot == pciMaxSlots {
		return 0, 0, fmt.Errorf("pci: no free slot for %s", dev.Name())
	}
	cfg := dev.Config()
	for _, bar := range cfg.BARs() {
		if bar.Kind == pci.BARIO {
			return 0, 0, fmt.Errorf("pci: %s: I/O BARs are not supported", dev.Name())
		}
		addr := (b.next + bar.Size - 1) &^ (bar.Size - 1)
		if addr+bar.Size > PCIMMIOEnd {
			return 0, 0, fmt.Errorf("pci: %s: MMIO window full", dev.Name())
		}
		if err := cfg.SetBARAddr(bar.Index, addr); err != nil {
			return 0, 0, fmt.Errorf("pci: %s: %w", dev.Name(), err)
		}
		b.next = addr + bar.Size
	}
	gsi = uint32(pciFirstGSI + (slot-1)%pciNumGSIs)
	cfg.SetInterrupt(uint8(gsi), 1)
	cfg.SetUint16(pci.RegCommand, cfg.Uint16(pci.RegCommand)|pci.CommandMemory)
	b.slots[slot] = dev
	b.remapLocked(slot)
	return slot, gsi, nil
}

// IRQs lists the INTx routing of the occupied slots, for the MP table.
func (b *PCIBus) IRQs() []PCIIRQ {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []PCIIRQ
	for s := 1; s < pciMaxSlots; s++ {
		if b.slots[s] != nil {
			out = append(out, PCIIRQ{Slot: uint8(s), GSI: b.slots[s].Config().InterruptLine()})
		}
	}
	return out
}

// barWindow puts one BAR of a device on the MMIO bus.
type barWindow struct {
	dev pci.Device
	bar int
}

func (w *barWindow) Name() string                  { return fmt.Sprintf("%s-bar%d", w.dev.Name(), w.bar) }
func (w *barWindow) Read(off uint64, data []byte)  { w.dev.ReadBAR(w.bar, off, data) }
func (w *barWindow) Write(off uint64, data []byte) { w.dev.WriteBAR(w.bar, off, data) }

// remapLocked brings slot's BAR mappings in line with its config space.
func (b *PCIBus) remapLocked(slot int) {
	dev := b.slots[slot]
	cfg := dev.Config()
	mapper, _ := dev.(pci.BARMapper)
	for _, bar := range cfg.BARs() {
		want := cfg.BARAddr(bar.Index)
		if !cfg.MemoryEnabled() || want == 0 || want+bar.Size < want || want&(bar.Size-1) != 0 {
			want = 0
		}
		have := b.mapped[slot][bar.Index]
		if want == have {
			continue
		}
		w := b.window[slot][bar.Index]
		if w == nil {
			w = &barWindow{dev: dev, bar: bar.Index}
			b.window[slot][bar.Index] = w
		}
		if have != 0 {
			b.mmio.Unregister(have, w)
		}
		b.mapped[slot][bar.Index] = 0
		if want != 0 {
			if err := b.mmio.Register(want, bar.Size, w); err != nil {
				want = 0 // overlaps something: leave it unmapped, as hardware would misbehave
			} else {
				b.mapped[slot][bar.Index] = want
			}
		}
		if mapper != nil {
			mapper.BARMapped(bar.Index, want)
		}
	}
}

// Name implements Device.
func (b *PCIBus) Name() string { return "pci-conf1" }

func (b *PCIBus) target(off uint64) (pci.Device, int, bool) {
	a := b.addr
	if a&0x8000_0000 == 0 {
		return nil, 0, false
	}
	bus, slot, fn := (a>>16)&0xff, (a>>11)&0x1f, (a>>8)&0x7
	if bus != 0 || fn != 0 || b.slots[slot] == nil {
		return nil, 0, false
	}
	return b.slots[slot], int(slot), true
}

// Read implements Device.
func (b *PCIBus) Read(off uint64, data []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if off < 4 {
		var buf [4]byte
		binary.LittleEndian.PutUint32(buf[:], b.addr)
		copy(data, buf[off:])
		return
	}
	dev, _, ok := b.target(off)
	if !ok {
		for i := range data {
			data[i] = 0xff
		}
		return
	}
	reg := int(b.addr&0xfc) + int(off-4)
	dev.Config().Read(reg, data)
}

// Write implements Device.
func (b *PCIBus) Write(off uint64, data []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if off < 4 {
		var buf [4]byte
		binary.LittleEndian.PutUint32(buf[:], b.addr)
		copy(buf[off:], data)
		b.addr = binary.LittleEndian.Uint32(buf[:])
		return
	}
	dev, slot, ok := b.target(off)
	if !ok || slot == 0 {
		return
	}
	reg := int(b.addr&0xfc) + int(off-4)
	if dev.Config().Write(reg, data) {
		b.remapLocked(slot)
	}
	if o, ok := dev.(pci.ConfigObserver); ok {
		o.ConfigChanged()
	}
}

// RemapAll re-reads every device's BARs, after a restore replaced their
// configuration space.
func (b *PCIBus) RemapAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for s := 1; s < pciMaxSlots; s++ {
		if b.slots[s] != nil {
			b.remapLocked(s)
			if o, ok := b.slots[s].(pci.ConfigObserver); ok {
				o.ConfigChanged()
			}
		}
	}
}
