package vmm

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// The MP table of two CPUs with virtio devices in slots 1 and 2, as the
// guest reads it: one line per entry, decoded, with its raw bytes.
// Rewrite with go test ./vmm -run MPTable -update-golden.
func TestMPTableGolden(t *testing.T) {
	b, err := MPTable(ebdaStart, 2, []PCIIRQ{{Slot: 1, GSI: 16}, {Slot: 2, GSI: 17}})
	require.NoError(t, err)
	got := describeMPTable(t, b)
	path := filepath.Join("testdata", "mptable-2cpu-2slot.golden")
	if *updateGolden {
		require.NoError(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, string(want), got)
}

// Every PCI INTx entry names the bus that the bus entries call "PCI", and
// that bus is 0 (Linux matches a device's PCI bus number against MP bus
// IDs); every ISA entry names the ISA bus.
func TestMPTableRoutesPCIBusZero(t *testing.T) {
	b, err := MPTable(ebdaStart, 3, []PCIIRQ{{Slot: 1, GSI: 16}, {Slot: 2, GSI: 17}, {Slot: 9, GSI: 16}})
	require.NoError(t, err)
	buses := map[uint8]string{}
	var pci []string
	isa := 0
	walkMPTable(t, b, func(e []byte) {
		switch e[0] {
		case mpEntryBus:
			buses[e[1]] = strings.TrimSpace(string(e[2:8]))
		case mpEntryIOIntr:
			switch buses[e[4]] {
			case "PCI":
				require.Equal(t, uint8(mpIRQFlagsLevelHigh), e[2], "PCI INTx is level-triggered, active high")
				pci = append(pci, fmt.Sprintf("bus %d slot %d INT%c -> pin %d", e[4], e[5]>>2, 'A'+e[5]&3, e[7]))
			case "ISA":
				require.Equal(t, e[5], e[7], "ISA IRQ n on pin n")
				isa++
			default:
				t.Fatalf("interrupt entry on unknown bus %d", e[4])
			}
			require.Equal(t, uint8(3), e[6], "IOAPIC ID follows the CPUs' APIC IDs")
		}
	})
	require.Equal(t, "PCI", buses[0], "PCI bus 0 is MP bus 0")
	require.Equal(t, []string{
		"bus 0 slot 1 INTA -> pin 16",
		"bus 0 slot 2 INTA -> pin 17",
		"bus 0 slot 9 INTA -> pin 16",
	}, pci)
	require.Equal(t, 16, isa)
}

func TestMPTableLayout(t *testing.T) {
	b, err := MPTable(ebdaStart, 3, []PCIIRQ{{Slot: 1, GSI: 16}, {Slot: 2, GSI: 17}})
	require.NoError(t, err)
	le := binary.LittleEndian
	require.Equal(t, "_MP_", string(b[0:4]))
	require.Equal(t, uint32(ebdaStart+16), le.Uint32(b[4:]))
	require.Zero(t, checksum(b[:16]), "floating pointer checksum")
	cfg := b[16:]
	require.Equal(t, "PCMP", string(cfg[0:4]))
	n := int(le.Uint16(cfg[4:]))
	require.Equal(t, len(cfg), n)
	require.Zero(t, checksum(cfg[:n]), "config table checksum")
	require.Equal(t, uint32(lapicAddr), le.Uint32(cfg[36:]))

	counts := map[uint8]int{}
	cpus, bsp := 0, 0
	walkMPTable(t, b, func(e []byte) {
		counts[e[0]]++
		switch e[0] {
		case mpEntryProcessor:
			require.Equal(t, uint8(cpus), e[1], "APIC IDs are 0..n-1")
			cpus++
			if e[3]&2 != 0 {
				bsp++
			}
		case mpEntryIOAPIC:
			require.Equal(t, uint32(ioapicAddr), le.Uint32(e[4:]))
		}
	})
	require.Equal(t, 3, counts[mpEntryProcessor])
	require.Equal(t, 1, bsp)
	require.Equal(t, 2, counts[mpEntryBus])
	require.Equal(t, 1, counts[mpEntryIOAPIC])
	require.Equal(t, 16+2, counts[mpEntryIOIntr])
	require.Equal(t, 2, counts[mpEntryLocalIntr])

	_, err = MPTable(ebdaStart, 0, nil)
	require.Error(t, err)
	_, err = MPTable(ebdaStart, 200, nil)
	require.ErrorContains(t, err, "do not fit")
	_, err = MPTable(ebdaStart, 1, []PCIIRQ{{Slot: 1, GSI: 3}})
	require.Error(t, err)
	_, err = MPTable(ebdaStart, MaxCPUs, nil)
	require.NoError(t, err, "MaxCPUs must fit in the EBDA")
}

// walkMPTable calls fn with each entry of the configuration table after
// checking that the entries fill it exactly.
func walkMPTable(t *testing.T, b []byte, fn func(e []byte)) {
	t.Helper()
	le := binary.LittleEndian
	cfg := b[16:]
	n, count := int(le.Uint16(cfg[4:])), int(le.Uint16(cfg[34:]))
	off := 44
	for i := 0; i < count; i++ {
		size := 8
		if cfg[off] == mpEntryProcessor {
			size = 20
		}
		require.LessOrEqual(t, off+size, n, "entry %d runs past the table", i)
		fn(cfg[off : off+size])
		off += size
	}
	require.Equal(t, n, off, "entries fill the table")
}

// describeMPTable renders the table one entry per line.
func describeMPTable(t *testing.T, b []byte) string {
	le := binary.LittleEndian
	var s strings.Builder
	fmt.Fprintf(&s, "floating pointer: config at %#x, spec 1.%d, checksum ok=%v\n", le.Uint32(b[4:]), b[9], checksum(b[:16]) == 0)
	cfg := b[16:]
	fmt.Fprintf(&s, "config table: %d bytes, %d entries, oem %q product %q, local APIC %#x, checksum ok=%v\n",
		le.Uint16(cfg[4:]), le.Uint16(cfg[34:]), cfg[8:16], cfg[16:28], le.Uint32(cfg[36:]), checksum(cfg[:le.Uint16(cfg[4:])]) == 0)
	kinds := map[uint8]string{mpIntINT: "INT", mpIntNMI: "NMI", mpIntExtINT: "ExtINT"}
	walkMPTable(t, b, func(e []byte) {
		switch e[0] {
		case mpEntryProcessor:
			fmt.Fprintf(&s, "processor   apic %d version %#x flags %#x signature %#x features %#x", e[1], e[2], e[3], le.Uint32(e[4:]), le.Uint32(e[8:]))
		case mpEntryBus:
			fmt.Fprintf(&s, "bus         id %d %q", e[1], e[2:8])
		case mpEntryIOAPIC:
			fmt.Fprintf(&s, "ioapic      id %d version %#x flags %#x address %#x", e[1], e[2], e[3], le.Uint32(e[4:]))
		case mpEntryIOIntr:
			fmt.Fprintf(&s, "io intr     %-6s flags %#02x bus %d irq %#02x -> ioapic %d pin %d", kinds[e[1]], le.Uint16(e[2:]), e[4], e[5], e[6], e[7])
		case mpEntryLocalIntr:
			fmt.Fprintf(&s, "local intr  %-6s flags %#02x bus %d irq %d -> lapic %#x lint%d", kinds[e[1]], le.Uint16(e[2:]), e[4], e[5], e[6], e[7])
		}
		fmt.Fprintf(&s, "  [% x]\n", e)
	})
	return s.String()
}
