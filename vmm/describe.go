package vmm

// What a stuck guest's vCPUs were doing, in one line: for the reports of
// a run or a test that timed out.

import (
	"encoding/binary"
	"fmt"
	"strings"

	"govmm/kvmapi"
)

// DescribeVCPUs says, for each vCPU, its MP state, RIP, RFLAGS (IF), CS,
// an interrupt being injected, an interrupt shadow or NMI state when
// there is one, and its local APIC's pending (IRR) and
// in-service (ISR) vectors, task priority and timer (LVT and initial
// count): enough to tell a halted guest waiting for an interrupt that
// never comes from one spinning with interrupts off.
func (s *MachineState) DescribeVCPUs() string {
	var b strings.Builder
	for i, v := range s.VCPUs {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "vCPU %d: mp_state %d, rip %#x, rflags %#x (IF %d), cs %#x",
			i, v.MPState.State, v.Regs.RIP, v.Regs.RFLAGS, v.Regs.RFLAGS>>9&1, v.Sregs.CS.Selector)
		if v.Events.Interrupt.Injected != 0 {
			fmt.Fprintf(&b, ", injecting vector %d", v.Events.Interrupt.Nr)
		}
		if v.Events.Interrupt.Shadow != 0 {
			fmt.Fprintf(&b, ", interrupt shadow %#x", v.Events.Interrupt.Shadow)
		}
		if v.Events.NMI.Injected != 0 || v.Events.NMI.Pending != 0 || v.Events.NMI.Masked != 0 {
			fmt.Fprintf(&b, ", nmi injected %d pending %d masked %d", v.Events.NMI.Injected, v.Events.NMI.Pending, v.Events.NMI.Masked)
		}
		fmt.Fprintf(&b, ", LAPIC irr %v isr %v tpr %#x lvt-timer %#x initial-count %d;",
			apicVectors(&v.LAPIC, 0x200), apicVectors(&v.LAPIC, 0x100), apicReg(&v.LAPIC, 0x80), apicReg(&v.LAPIC, 0x320), apicReg(&v.LAPIC, 0x380))
	}
	return b.String()
}

// apicReg is the local APIC register at offset off.
func apicReg(l *kvmapi.LAPICState, off int) uint32 {
	return binary.LittleEndian.Uint32(l.Regs[off : off+4])
}

// apicVectors lists the vectors set in the 256-bit register (IRR, ISR)
// whose eight 32-bit words start at off, 16 bytes apart.
func apicVectors(l *kvmapi.LAPICState, off int) []int {
	var vs []int
	for w := range 8 {
		r := apicReg(l, off+16*w)
		for bit := range 32 {
			if r&(1<<bit) != 0 {
				vs = append(vs, 32*w+bit)
			}
		}
	}
	return vs
}
