package vmm

import (
	"encoding/binary"
	"fmt"
)

// The MP table (Intel MultiProcessor Specification 1.4) tells a guest
// without ACPI how many CPUs it has, where the IOAPIC is, and how ISA and
// PCI interrupts reach IOAPIC pins. Linux finds the floating pointer by
// scanning the EBDA.

const (
	mpEntryProcessor = 0
	mpEntryBus       = 1
	mpEntryIOAPIC    = 2
	mpEntryIOIntr    = 3
	mpEntryLocalIntr = 4

	mpIntINT    = 0
	mpIntNMI    = 1
	mpIntExtINT = 3

	// Bus IDs. Linux looks a PCI device's INTx up by its PCI bus number
	// in the MP bus IDs (IO_APIC_get_PCI_irq_vector), so PCI bus 0 must
	// be MP bus 0; ISA comes after it, as in SeaBIOS's tables.
	mpBusPCI = 0
	mpBusISA = 1

	apicVersion   = 0x14
	ioapicVersion = 0x11
	// mpIRQFlagsLevelHigh: polarity active-high, level-triggered.
	mpIRQFlagsLevelHigh = 0x0d
	ioapicPins          = 24
)

// PCIIRQ is one PCI INTx routing: device slot's INTA# to an IOAPIC pin.
type PCIIRQ struct {
	Slot uint8
	GSI  uint8
}

// MPTable builds the floating pointer and configuration table for ncpus
// processors (APIC IDs 0..ncpus-1), to be placed at addr. ISA IRQs 0..15
// go to IOAPIC pins 0..15 as KVM's default routing does; pci routes each
// slot's INTA# (bus 0, source IRQ slot<<2 | pin 0) to the IOAPIC pin the
// host bridge wired it to, level-triggered and active-high as PCIBus
// drives it. Without those entries Linux finds no IRQ for a device's INTx
// ("can't find IRQ for PCI INT A; probably buggy MP table").
func MPTable(addr uint64, ncpus int, pci []PCIIRQ) ([]byte, error) {
	if ncpus < 1 || ncpus > 254 {
		return nil, fmt.Errorf("mp table: %d cpus out of range 1..254", ncpus)
	}
	ioapicID := uint8(ncpus)
	var e mpEntries
	for i := 0; i < ncpus; i++ {
		e.processor(uint8(i), i == 0)
	}
	e.bus(mpBusPCI, "PCI")
	e.bus(mpBusISA, "ISA")
	e.ioapic(ioapicID)
	for irq := uint8(0); irq < 16; irq++ {
		e.ioIntr(ioapicID, mpIntINT, 0, mpBusISA, irq, irq)
	}
	for _, p := range pci {
		if p.GSI < 16 || p.GSI >= ioapicPins || p.Slot >= 32 {
			return nil, fmt.Errorf("mp table: pci slot %d gsi %d out of range", p.Slot, p.GSI)
		}
		e.ioIntr(ioapicID, mpIntINT, mpIRQFlagsLevelHigh, mpBusPCI, p.Slot<<2, p.GSI) // INTA#
	}
	e.localIntr(mpIntExtINT, 0)
	e.localIntr(mpIntNMI, 1)

	le := binary.LittleEndian
	const fpSize, hdrSize = 16, 44
	cfgAddr := addr + fpSize
	cfg := make([]byte, hdrSize, hdrSize+len(e.b))
	copy(cfg[0:4], "PCMP")
	le.PutUint16(cfg[4:], uint16(hdrSize+len(e.b)))
	cfg[6] = 4 // spec revision 1.4
	copy(cfg[8:16], "GOVMM   ")
	copy(cfg[16:28], "GOVMM-VM    ")
	le.PutUint16(cfg[34:], uint16(e.n))
	le.PutUint32(cfg[36:], lapicAddr)
	cfg = append(cfg, e.b...)
	cfg[7] = checksum(cfg)

	fp := make([]byte, fpSize)
	copy(fp[0:4], "_MP_")
	le.PutUint32(fp[4:], uint32(cfgAddr))
	fp[8] = 1 // length in 16-byte units
	fp[9] = 4 // spec revision 1.4
	fp[10] = checksum(fp)

	out := append(fp, cfg...)
	if uint64(len(out)) > biosStart-addr {
		return nil, fmt.Errorf("mp table: %d bytes do not fit below %#x", len(out), biosStart)
	}
	return out, nil
}

// mpEntries is the configuration table's entries as they are added, and
// their count.
type mpEntries struct {
	b []byte
	n int
}

func (m *mpEntries) add(e []byte) { m.b = append(m.b, e...); m.n++ }

func (m *mpEntries) processor(apicID uint8, bsp bool) {
	e := make([]byte, 20)
	e[0] = mpEntryProcessor
	e[1] = apicID
	e[2] = apicVersion
	e[3] = 1 // enabled
	if bsp {
		e[3] |= 2 // bootstrap processor
	}
	binary.LittleEndian.PutUint32(e[4:], 0x600) // CPU signature: family 6
	binary.LittleEndian.PutUint32(e[8:], 0x201) // features: FPU, APIC
	m.add(e)
}

func (m *mpEntries) bus(id uint8, name string) {
	e := make([]byte, 8)
	e[0] = mpEntryBus
	e[1] = id
	copy(e[2:8], fmt.Sprintf("%-6s", name))
	m.add(e)
}

func (m *mpEntries) ioapic(id uint8) {
	e := make([]byte, 8)
	e[0] = mpEntryIOAPIC
	e[1] = id
	e[2] = ioapicVersion
	e[3] = 1 // enabled
	binary.LittleEndian.PutUint32(e[4:], ioapicAddr)
	m.add(e)
}

// ioIntr routes bus's busIRQ to pin of the IOAPIC ioapicID.
func (m *mpEntries) ioIntr(ioapicID, kind uint8, flags uint16, bus, busIRQ, pin uint8) {
	e := make([]byte, 8)
	e[0] = mpEntryIOIntr
	e[1] = kind
	binary.LittleEndian.PutUint16(e[2:], flags)
	e[4] = bus
	e[5] = busIRQ
	e[6] = ioapicID
	e[7] = pin
	m.add(e)
}

// localIntr wires kind to LINTn of every local APIC.
func (m *mpEntries) localIntr(kind uint8, lint uint8) {
	e := make([]byte, 8)
	e[0] = mpEntryLocalIntr
	e[1] = kind
	e[4] = mpBusISA
	e[6] = 0xff // all local APICs
	e[7] = lint
	m.add(e)
}

// checksum returns the byte that makes b sum to zero (b's checksum byte
// must be zero when called).
func checksum(b []byte) uint8 {
	var s uint8
	for _, x := range b {
		s += x
	}
	return -s
}
