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
