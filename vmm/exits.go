package vmm

import "govmm/kvmapi"

// The vCPUs' exit counters, for metrics.

// ExitCounts sums, by reason, the vCPU exits that reached govmm's loop
// (I/O, MMIO, shutdown...). KVM handles most exits itself (halts,
// interrupts, its in-kernel APIC and timers, virtio notifications through
// ioeventfd), so an idle or well-behaved guest adds few here: see
// KVMExits for all of them.
func (m *Machine) ExitCounts() map[kvmapi.ExitReason]uint64 {
	out := map[kvmapi.ExitReason]uint64{}
	for _, c := range m.vcpus {
		for r := range c.exits {
			if n := c.exits[r].Load(); n > 0 {
				out[kvmapi.ExitReason(r)] += n
			}
		}
	}
	return out
}

// KVMExits returns every VM exit of each vCPU so far, as KVM counts them
// (its "exits" statistic, KVM API 4.134), whether KVM handled the exit or
// govmm did. ok is false when KVM has no binary statistics (Linux before
// 5.14). Safe from any goroutine while the machine exists.
func (m *Machine) KVMExits() (perVCPU []uint64, ok bool) {
	perVCPU = make([]uint64, len(m.vcpus))
	for i, c := range m.vcpus {
		st := c.stats.Load()
		if st == nil {
			return nil, false
		}
		n, err := st.Read("exits")
		if err != nil {
			return nil, false
		}
		perVCPU[i] = n
	}
	return perVCPU, len(m.vcpus) > 0
}

// KVMEventNames are the vCPU statistics KVMEvents reads: the kinds of
// exit KVM handles itself and the interrupt machinery around them, what
// tells a guest spinning on a pause loop, or waiting for an interrupt
// window that never opens, from one that computes (KVM API 4.134; each
// counts since the vCPU was created).
var KVMEventNames = []string{
	"halt_exits", "irq_exits", "irq_window_exits", "irq_injections",
	"nmi_window_exits", "nmi_injections", "request_irq_exits", "signal_exits",
	"io_exits", "mmio_exits", "insn_emulation", "pf_taken", "hypercalls",
}

// KVMEvents returns, for each vCPU, the statistics of KVMEventNames that
// its kernel has (a name the kernel lacks is left out). ok is false when
// KVM has no binary statistics. Safe from any goroutine while the machine
// exists.
func (m *Machine) KVMEvents() (perVCPU []map[string]uint64, ok bool) {
	perVCPU = make([]map[string]uint64, len(m.vcpus))
	for i, c := range m.vcpus {
		st := c.stats.Load()
		if st == nil {
			return nil, false
		}
		perVCPU[i] = map[string]uint64{}
		for _, name := range KVMEventNames {
			if !st.Has(name) {
				continue
			}
			n, err := st.Read(name)
			if err != nil {
				return nil, false
			}
			perVCPU[i][name] = n
		}
	}
	return perVCPU, len(m.vcpus) > 0
}
