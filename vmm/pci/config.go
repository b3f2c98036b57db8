package pci

import (
	"encoding/binary"
	"fmt"
	"sync"
)

// Standard header offsets (PCI Local Bus spec 3.0, §6.1).
const (
	RegVendorID     = 0x00
	RegDeviceID     = 0x02
	RegCommand      = 0x04
	RegStatus       = 0x06
	RegRevision     = 0x08
	RegClassProg    = 0x09
	RegSubclass     = 0x0a
	RegClass        = 0x0b
	RegHeaderType   = 0x0e
	RegBAR0         = 0x10
	RegSubVendorID  = 0x2c
	RegSubsystemID  = 0x2e
	RegCapPtr       = 0x34
	RegInterruptLn  = 0x3c
	RegInterruptPin = 0x3d

	CommandIO          = 1 << 0
	CommandMemory      = 1 << 1
	CommandMaster      = 1 << 2
	CommandIntxDisable = 1 << 10

	StatusCapList = 1 << 4

	// ConfigSize is the size of a conventional configuration space.
	ConfigSize = 256

	// NumBARs is the number of BAR registers in a type-0 header.
	NumBARs = 6
)

// Capability IDs.
const (
	CapMSIX   = 0x11
	CapVendor = 0x09
)

// BARKind says what a BAR maps.
type BARKind uint8

const (
	BARMem32 BARKind = iota // 32-bit memory
	BARMem64                // 64-bit memory (uses this BAR and the next)
	BARIO                   // port I/O
)

// BAR describes one base address register a device wants.
type BAR struct {
	Index int // 0..5
	Kind  BARKind
	Size  uint64 // a power of two, at least 16 (4 for I/O)
}

// Identity is the fixed part of a type-0 header.
type Identity struct {
	VendorID, DeviceID       uint16
	SubVendorID, SubsystemID uint16
	Revision                 uint8
	Class, Subclass, ProgIF  uint8
}

// ConfigSpace is a type-0 configuration space: 256 bytes, a mask of the
// bits the guest may write, and the BAR layout.
type ConfigSpace struct {
	mu    sync.Mutex // guards all fields below
	data  [ConfigSize]byte
	wmask [ConfigSize]byte
	bars  [NumBARs]*BAR
	// lastCap is the offset of the last capability, 0 before the first.
	lastCap int
	// nextCap is where the next capability goes.
	nextCap int
}

// NewConfigSpace builds a header with the given identity and BARs.
func NewConfigSpace(id Identity, bars []BAR) (*ConfigSpace, error) {
	c := &ConfigSpace{nextCap: 0x40}
	le := binary.LittleEndian
	le.PutUint16(c.data[RegVendorID:], id.VendorID)
	le.PutUint16(c.data[RegDeviceID:], id.DeviceID)
	c.data[RegRevision] = id.Revision
	c.data[RegClassProg] = id.ProgIF
	c.data[RegSubclass] = id.Subclass
	c.data[RegClass] = id.Class
	le.PutUint16(c.data[RegSubVendorID:], id.SubVendorID)
	le.PutUint16(c.data[RegSubsystemID:], id.SubsystemID)
	// Command: I/O, memory, bus master and INTx-disable are writable.
	le.PutUint16(c.wmask[RegCommand:], CommandIO|CommandMemory|CommandMaster|CommandIntxDisable)
	// Interrupt Line stays read-only: the host bridge writes the GSI
	// and devices read it back, so a guest must not move their INTx.
	for i := range bars {
		b := bars[i]
		if b.Index < 0 || b.Index >= NumBARs || (b.Kind == BARMem64 && b.Index == NumBARs-1) {
			return nil, fmt.Errorf("pci: bar %d: bad index", b.Index)
		}
		min := uint64(16)
		if b.Kind == BARIO {
			min = 4
		}
		if b.Size < min || b.Size&(b.Size-1) != 0 {
			return nil, fmt.Errorf("pci: bar %d: size %#x is not a power of two >= %d", b.Index, b.Size, min)
		}
		if c.bars[b.Index] != nil || (b.Kind == BARMem64 && c.bars[b.Index+1] != nil) {
			return nil, fmt.Errorf("pci: bar %d: declared twice", b.Index)
		}
		c.bars[b.Index] = &b
		if b.Kind == BARMem64 {
			c.bars[b.Index+1] = &b // the upper half belongs to the same BAR
		}
		c.setBARLocked(b.Index, 0)
		mask := ^(b.Size - 1)
		switch b.Kind {
		case BARIO:
			le.PutUint32(c.wmask[RegBAR0+4*b.Index:], uint32(mask)&^3)
		case BARMem32:
			le.PutUint32(c.wmask[RegBAR0+4*b.Index:], uint32(mask)&^0xf)
		case BARMem64:
			le.PutUint32(c.wmask[RegBAR0+4*b.Index:], uint32(mask)&^0xf)
			le.PutUint32(c.wmask[RegBAR0+4*b.Index+4:], uint32(mask>>32))
		}
	}
	return c, nil
}

// AddCapability appends a capability with the given ID and body (the bytes
// after the ID and next pointer) and returns its offset. writable marks
// which body bytes the guest may write (nil: none); it is the same length
// as body.
func (c *ConfigSpace) AddCapability(id uint8, body, writable []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	off := c.nextCap
	n := 2 + len(body)
	if off+n > ConfigSize {
		return 0, fmt.Errorf("pci: capability %#x does not fit in config space", id)
	}
	c.data[off] = id
	c.data[off+1] = 0
	copy(c.data[off+2:], body)
	if writable != nil {
		copy(c.wmask[off+2:], writable)
	}
	if c.lastCap == 0 {
		c.data[RegCapPtr] = byte(off)
		binary.LittleEndian.PutUint16(c.data[RegStatus:],
			binary.LittleEndian.Uint16(c.data[RegStatus:])|StatusCapList)
	} else {
		c.data[c.lastCap+1] = byte(off)
	}
	c.lastCap = off
	c.nextCap = (off + n + 3) &^ 3
	return off, nil
}

// Read copies len(data) bytes at off (which the caller keeps inside
// ConfigSize; bytes past the end read as ones).
func (c *ConfigSpace) Read(off int, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range data {
		if off+i < ConfigSize && off+i >= 0 {
			data[i] = c.data[off+i]
		} else {
			data[i] = 0xff
		}
	}
}

// Write applies a guest write under the writable mask and reports whether
// it touched the command register or a BAR, so the host bridge can remap.
func (c *ConfigSpace) Write(off int, data []byte) (remap bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, b := range data {
		o := off + i
		if o < 0 || o >= ConfigSize {
			continue
		}
		c.data[o] = c.data[o]&^c.wmask[o] | b&c.wmask[o]
		if (o >= RegCommand && o < RegCommand+2) || (o >= RegBAR0 && o < RegBAR0+4*NumBARs) {
			remap = true
		}
	}
	return remap
}

// Uint16 reads a 16-bit register.
func (c *ConfigSpace) Uint16(off int) uint16 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return binary.LittleEndian.Uint16(c.data[off:])
}

// Uint32 reads a 32-bit register.
func (c *ConfigSpace) Uint32(off int) uint32 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return binary.LittleEndian.Uint32(c.data[off:])
}

// SetUint16 writes a 16-bit register regardless of the writable mask (for
// the device itself).
func (c *ConfigSpace) SetUint16(off int, v uint16) {
	c.mu.Lock()
	defer c.mu.Unlock()
	binary.LittleEndian.PutUint16(c.data[off:], v)
}

// BARs returns the declared BARs (each 64-bit BAR once).
func (c *ConfigSpace) BARs() []BAR {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []BAR
	for i, b := range c.bars {
		if b != nil && b.Index == i {
			out = append(out, *b)
		}
	}
	return out
}

// BARAddr is the address currently programmed in BAR i.
func (c *ConfigSpace) BARAddr(i int) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.barAddrLocked(i)
}

func (c *ConfigSpace) barAddrLocked(i int) uint64 {
	b := c.bars[i]
	if b == nil {
		return 0
	}
	le := binary.LittleEndian
	lo := uint64(le.Uint32(c.data[RegBAR0+4*i:]))
	switch b.Kind {
	case BARIO:
		return lo &^ 3
	case BARMem64:
		return lo&^0xf | uint64(le.Uint32(c.data[RegBAR0+4*i+4:]))<<32
	default:
		return lo &^ 0xf
	}
}

// SetBARAddr programs BAR i, as firmware would before the guest boots.
func (c *ConfigSpace) SetBARAddr(i int, addr uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.bars[i]
	if b == nil || b.Index != i {
		return fmt.Errorf("pci: bar %d not declared", i)
	}
	if addr&(b.Size-1) != 0 {
		return fmt.Errorf("pci: bar %d: address %#x not aligned to size %#x", i, addr, b.Size)
	}
	if b.Kind != BARMem64 && addr>>32 != 0 {
		return fmt.Errorf("pci: bar %d: address %#x above 4 GiB in a 32-bit bar", i, addr)
	}
	c.setBARLocked(i, addr)
	return nil
}

func (c *ConfigSpace) setBARLocked(i int, addr uint64) {
	b := c.bars[i]
	le := binary.LittleEndian
	switch b.Kind {
	case BARIO:
		le.PutUint32(c.data[RegBAR0+4*i:], uint32(addr)|1)
	case BARMem32:
		le.PutUint32(c.data[RegBAR0+4*i:], uint32(addr))
	case BARMem64:
		le.PutUint32(c.data[RegBAR0+4*i:], uint32(addr)|4)
		le.PutUint32(c.data[RegBAR0+4*i+4:], uint32(addr>>32))
	}
}

// MemoryEnabled reports the command register's memory-decode bit.
func (c *ConfigSpace) MemoryEnabled() bool { return c.Uint16(RegCommand)&CommandMemory != 0 }

// IOEnabled reports the command register's I/O-decode bit.
func (c *ConfigSpace) IOEnabled() bool { return c.Uint16(RegCommand)&CommandIO != 0 }

// Snapshot returns the raw 256 bytes, for device state.
func (c *ConfigSpace) Snapshot() [ConfigSize]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.data
}

// Restore replaces the raw bytes (identity and layout must match; the
// caller checked the device kind).
func (c *ConfigSpace) Restore(data [ConfigSize]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.data = data
}

// SetInterrupt sets the Interrupt Line (the GSI the host routes INTx to)
// and Interrupt Pin (1 = INTA#) registers, as firmware would.
func (c *ConfigSpace) SetInterrupt(line, pin uint8) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.data[RegInterruptLn] = line
	c.data[RegInterruptPin] = pin
}

// InterruptLine is the Interrupt Line register.
func (c *ConfigSpace) InterruptLine() uint8 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.data[RegInterruptLn]
}
