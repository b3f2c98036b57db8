package vmm

import (
	"fmt"
	"math/bits"
	"strings"

	"govmm/kvmapi"
)

// A guest reads CPUID once, at boot, and from then on uses what it found:
// an instruction set extension, an XSAVE component, a paravirtual clock.
// A saved machine therefore carries the CPUID its guest saw, restore
// gives the guest exactly that CPUID again, and a host that cannot offer
// every feature in it is refused before anything runs (and, in a
// migration or replication, before the checkpoint is acknowledged, so the
// source keeps the guest). The TSC frequency is part of the same promise:
// the guest calibrated its clocks against it.

// featureWord is one CPUID register that lists features, one per bit.
type featureWord struct {
	function, index uint32
	reg             byte // 'a', 'b', 'c' or 'd'
	name            string
}

// featureWords are the registers compared between a saved CPUID and the
// one this host can offer. The other leaves (cache and topology
// descriptions, the brand string, sizes) describe rather than enable, and
// are restored as saved.
var featureWords = []featureWord{
	{0x1, 0, 'c', "1.ECX"},
	{0x1, 0, 'd', "1.EDX"},
	{0x7, 0, 'b', "7.0.EBX"},
	{0x7, 0, 'c', "7.0.ECX"},
	{0x7, 0, 'd', "7.0.EDX"},
	{0x7, 1, 'a', "7.1.EAX"},
	{0xd, 0, 'a', "0xD.0.EAX (XCR0 low)"},
	{0xd, 0, 'd', "0xD.0.EDX (XCR0 high)"},
	{0xd, 1, 'a', "0xD.1.EAX"},
	{0x40000001, 0, 'a', "0x40000001.EAX (KVM features)"},
	{0x80000001, 0, 'c', "0x80000001.ECX"},
	{0x80000001, 0, 'd', "0x80000001.EDX"},
	{0x80000007, 0, 'd', "0x80000007.EDX"},
	{0x80000008, 0, 'b', "0x80000008.EBX"},
}

// cpuidReg returns register reg of leaf function/index in entries, and
// whether the leaf is there.
func cpuidReg(entries []kvmapi.CPUIDEntry, function, index uint32, reg byte) (uint32, bool) {
	for _, e := range entries {
		if e.Function != function || (e.Flags&kvmapi.CPUIDFlagSignificantIndex != 0 && e.Index != index) {
			continue
		}
		switch reg {
		case 'a':
			return e.EAX, true
		case 'b':
			return e.EBX, true
		case 'c':
			return e.ECX, true
		default:
			return e.EDX, true
		}
	}
	return 0, false
}

// vendor is the CPU vendor string of leaf 0.
func vendor(entries []kvmapi.CPUIDEntry) string {
	var b [12]byte
	for i, reg := range []byte{'b', 'd', 'c'} {
		v, _ := cpuidReg(entries, 0, 0, reg)
		for j := 0; j < 4; j++ {
			b[4*i+j] = byte(v >> (8 * j))
		}
	}
	return strings.TrimRight(string(b[:]), "\x00")
}

// checkCPUID refuses a saved CPUID (what the guest booted with) that the
// CPUID this host offers (here) cannot honour: another vendor, or a
// feature bit the guest saw that is missing here. The error names the
// register and the bits.
func checkCPUID(saved, here []kvmapi.CPUIDEntry) error {
	if v, h := vendor(saved), vendor(here); v != h {
		return fmt.Errorf("the guest booted on a %q CPU, this host's is %q", v, h)
	}
	var missing []string
	for _, w := range featureWords {
		s, ok := cpuidReg(saved, w.function, w.index, w.reg)
		if !ok || s == 0 {
			continue
		}
		h, _ := cpuidReg(here, w.function, w.index, w.reg)
		if lack := s &^ h; lack != 0 {
			missing = append(missing, fmt.Sprintf("%s bits %s", w.name, bitList(lack)))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("CPU features the guest uses are missing here: %s", strings.Join(missing, "; "))
	}
	return nil
}

func bitList(v uint32) string {
	var out []string
	for v != 0 {
		b := bits.TrailingZeros32(v)
		out = append(out, fmt.Sprint(b))
		v &^= 1 << b
	}
	return strings.Join(out, ",")
}

// tscTolerancePPM is how far KVM lets a requested TSC rate be from the
// host's without scaling it (kvm.tsc_tolerance_ppm's default).
const tscTolerancePPM = 250

// checkTSC refuses a guest TSC rate this host cannot give: KVM without TSC
// scaling (KVM_CAP_TSC_CONTROL) runs a faster rate by catching up, but
// refuses a slower one beyond its tolerance. here is 0 when unknown.
func checkTSC(saved, here uint32, scaling bool) error {
	if saved == 0 || here == 0 || scaling || saved >= here {
		return nil
	}
	if uint64(here-saved)*1_000_000 <= uint64(here)*tscTolerancePPM {
		return nil
	}
	return fmt.Errorf("the guest's TSC runs at %d kHz, this host's at %d kHz, and KVM here cannot scale it down", saved, here)
}
