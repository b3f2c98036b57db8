package vmm

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/vmm/pci"
)

type nopDevice struct{ name string }

func (d *nopDevice) Name() string         { return d.name }
func (d *nopDevice) Read(uint64, []byte)  {}
func (d *nopDevice) Write(uint64, []byte) {}

type recDevice struct {
	nopDevice
	lastOff uint64
	wrote   []byte
}

func (d *recDevice) Read(off uint64, data []byte) {
	d.lastOff = off
	for i := range data {
		data[i] = byte(off) + byte(i)
	}
}
func (d *recDevice) Write(off uint64, data []byte) {
	d.lastOff = off
	d.wrote = append([]byte(nil), data...)
}

func TestBusRegister(t *testing.T) {
	b := NewBus("pio")
	a := &recDevice{nopDevice: nopDevice{"a"}}
	require.NoError(t, b.Register(0x100, 0x10, a))
	require.ErrorIs(t, b.Register(0x10f, 1, &nopDevice{"b"}), ErrOverlap)
	require.ErrorIs(t, b.Register(0xf0, 0x11, &nopDevice{"b"}), ErrOverlap)
	require.ErrorContains(t, b.Register(0x200, 0, &nopDevice{"b"}), "empty")
	require.ErrorContains(t, b.Register(^uint64(0), 2, &nopDevice{"b"}), "overflow")
	require.NoError(t, b.Register(0x110, 1, &nopDevice{"adjacent"}))

	buf := make([]byte, 2)
	b.Read(0x104, buf)
	require.Equal(t, uint64(4), a.lastOff, "offset relative to the base")
	require.Equal(t, []byte{4, 5}, buf)
	b.Write(0x10e, []byte{1, 2})
	require.Equal(t, []byte{1, 2}, a.wrote)

	b.Read(0x300, buf)
	require.Equal(t, []byte{0xff, 0xff}, buf, "unclaimed reads are all-ones")
	b.Read(0x10f, buf) // straddles the end of a
	require.Equal(t, []byte{0xff, 0xff}, buf)
	require.Equal(t, uint64(2), b.Unclaimed.Load())

	require.True(t, b.Unregister(0x100, a))
	require.False(t, b.Unregister(0x100, a))
	require.NoError(t, b.Register(0x100, 0x10, a))
}

type irqRecorder struct{ levels []bool }

func (r *irqRecorder) set(l bool) { r.levels = append(r.levels, l) }

func TestUARTTransmitAndInterrupts(t *testing.T) {
	var out syncBuffer
	irq := &irqRecorder{}
	u := NewUART(&out, irq.set)
	rd := func(off uint64) byte { b := []byte{0}; u.Read(off, b); return b[0] }

	require.Equal(t, byte(iirNoInt), rd(uartIIR))
	u.Write(uartIER, []byte{ierTHRI})
	require.Equal(t, []bool{true}, irq.levels, "enabling THRI with THR empty interrupts at once")
	require.Equal(t, byte(iirTHRI), rd(uartIIR))
	require.Equal(t, []bool{true, false}, irq.levels, "reading IIR acknowledges THRE")
	require.Equal(t, byte(iirNoInt), rd(uartIIR))

	for _, c := range []byte("hi\n") {
		u.Write(uartRBR, []byte{c})
	}
	require.Equal(t, "hi\n", out.String(), "a full line goes out at once")
	u.Write(uartRBR, []byte{'$'})
	require.Eventually(t, func() bool { return out.String() == "hi\n$" }, time.Second, time.Millisecond,
		"a partial line goes out shortly")
	require.Equal(t, byte(lsrTHRE|lsrTEMT), rd(uartLSR))

	// Receive.
	u.Write(uartIER, []byte{ierRDI})
	u.Input([]byte("ab"))
	require.Equal(t, byte(lsrTHRE|lsrTEMT|lsrDR), rd(uartLSR))
	require.Equal(t, byte(iirRDI), rd(uartIIR))
	require.Equal(t, byte('a'), rd(uartRBR))
	require.Equal(t, byte('b'), rd(uartRBR))
	require.Equal(t, byte(iirNoInt), rd(uartIIR))
	require.False(t, irq.levels[len(irq.levels)-1], "line low once drained")

	// Divisor latch and loopback, as Linux's autoconfig probes them.
	u.Write(uartLCR, []byte{lcrDLAB})
	u.Write(uartRBR, []byte{1})
	require.Equal(t, byte(1), rd(uartRBR))
	u.Write(uartLCR, []byte{0x03})
	u.Write(uartMCR, []byte{mcrLoop | 0x0a}) // RTS, OUT2
	require.Equal(t, byte(msrCTS|msrDCD), rd(uartMSR))
	u.Write(uartSCR, []byte{0x5a})
	require.Equal(t, byte(0x5a), rd(uartSCR))
	u.Write(uartIIR, []byte{fcrEnable})
	require.Equal(t, byte(iirFIFOsOn), rd(uartIIR)&0xc0, "16550A FIFO bits")
}

func TestRTCReadsHostTime(t *testing.T) {
	now := time.Date(2026, 11, 26, 17, 45, 9, 0, time.UTC)
	r := NewRTC(func() time.Time { return now })
	get := func(reg byte) byte {
		r.Write(0, []byte{reg})
		b := []byte{0}
		r.Read(1, b)
		return b[0]
	}
	require.Equal(t, byte(0x09), get(0x00))
	require.Equal(t, byte(0x45), get(0x02))
	require.Equal(t, byte(0x17), get(0x04))
	require.Equal(t, byte(0x26), get(0x07))
	require.Equal(t, byte(0x11), get(0x08))
	require.Equal(t, byte(0x26), get(0x09))
	require.Equal(t, byte(0x20), get(0x32))
	require.Zero(t, get(0x0a)&0x80, "no update in progress")
	r.Write(0, []byte{0x40})
	r.Write(1, []byte{0x77})
	require.Equal(t, byte(0x77), get(0x40), "CMOS RAM stores")
	r.Write(0, []byte{0x80 | 0x00}) // NMI mask bit ignored
	require.Equal(t, byte(0x09), get(0x00))
}

func TestI8042(t *testing.T) {
	resets := 0
	k := NewI8042(func() { resets++ })
	rd := func(off uint64) byte { b := []byte{0}; k.Read(off, b); return b[0] }
	require.Zero(t, rd(4)&i8042StatusOBF)
	k.Write(4, []byte{i8042CmdSelfTest})
	require.NotZero(t, rd(4)&i8042StatusOBF)
	require.Equal(t, byte(0x55), rd(0))
	k.Write(4, []byte{i8042CmdWriteCTR})
	k.Write(0, []byte{0x30})
	k.Write(4, []byte{i8042CmdReadCTR})
	require.Equal(t, byte(0x30), rd(0))
	require.Zero(t, resets)
	k.Write(4, []byte{i8042CmdResetCPU})
	require.Equal(t, 1, resets)
}

// fakePCIDev is a device with one 64-bit memory BAR.
type fakePCIDev struct {
	cfg    *pci.ConfigSpace
	mapped []uint64
	reads  []uint64
}

func (d *fakePCIDev) Name() string                              { return "fake" }
func (d *fakePCIDev) Config() *pci.ConfigSpace                  { return d.cfg }
func (d *fakePCIDev) ReadBAR(bar int, off uint64, data []byte)  { d.reads = append(d.reads, off) }
func (d *fakePCIDev) WriteBAR(bar int, off uint64, data []byte) {}
func (d *fakePCIDev) BARMapped(bar int, addr uint64)            { d.mapped = append(d.mapped, addr) }

func TestPCIBusConf1(t *testing.T) {
	mmio := NewBus("mmio")
	b, err := NewPCIBus(mmio)
	require.NoError(t, err)
	cfg, err := pci.NewConfigSpace(pci.Identity{VendorID: 0x1af4, DeviceID: 0x1041}, []pci.BAR{{Index: 0, Kind: pci.BARMem64, Size: 0x4000}})
	require.NoError(t, err)
	dev := &fakePCIDev{cfg: cfg}
	slot, gsi, err := b.Add(dev)
	require.NoError(t, err)
	require.Equal(t, 1, slot)
	require.Equal(t, uint32(16), gsi)
	require.Equal(t, []PCIIRQ{{Slot: 1, GSI: 16}}, b.IRQs())
	require.Equal(t, []uint64{PCIHoleStart}, dev.mapped, "BAR assigned and mapped at attach")

	le := binary.LittleEndian
	w32 := func(off uint64, v uint32) { var x [4]byte; le.PutUint32(x[:], v); b.Write(off, x[:]) }
	r32 := func(off uint64) uint32 { var x [4]byte; b.Read(off, x[:]); return le.Uint32(x[:]) }
	addr := func(slot, reg uint32) uint32 { return 0x8000_0000 | slot<<11 | reg }

	w32(0, addr(0, 0))
	require.Equal(t, addr(0, 0), r32(0), "CONFIG_ADDRESS reads back (Linux's conf1 probe)")
	require.Equal(t, uint32(0x29c0_8086), r32(4), "host bridge IDs")
	w32(0, addr(1, 0))
	require.Equal(t, uint32(0x1041_1af4), r32(4))
	w32(0, addr(5, 0))
	require.Equal(t, uint32(0xffff_ffff), r32(4), "empty slot")
	w32(0, addr(1, 0)|1<<8)
	require.Equal(t, uint32(0xffff_ffff), r32(4), "function 1 absent")

	// The guest sizes BAR0 with decoding off, then moves it.
	w32(0, addr(1, pci.RegCommand))
	w32(4, 0)
	w32(0, addr(1, pci.RegBAR0))
	w32(4, 0xffff_ffff)
	require.Equal(t, uint32(0xffff_c004), r32(4), "size mask, 64-bit type")
	w32(4, 0xd000_0000)
	w32(0, addr(1, pci.RegCommand))
	w32(4, pci.CommandMemory)
	require.Equal(t, []uint64{PCIHoleStart, 0, 0xd000_0000}, dev.mapped)
	mmio.Read(0xd000_0010, make([]byte, 4))
	require.Equal(t, []uint64{0x10}, dev.reads, "BAR accesses reach the device, relative to the BAR")
	mmio.Read(PCIHoleStart, make([]byte, 4))
	require.Equal(t, uint64(1), mmio.Unclaimed.Load(), "old address unmapped")
}
