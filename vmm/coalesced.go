package vmm

import (
	"sync"
	"sync/atomic"

	"govmm/kvmapi"
)

// Coalesced port writes. Two ports only latch a value that a later access
// uses: the PCI host's CONFIG_ADDRESS (0xcf8, each config access writes
// it, then reads or writes 0xcfc) and the RTC's index (0x70, before each
// 0x71). KVM can queue the guest's writes to them in a ring shared with
// the VMM instead of exiting to it (KVM_CAP_COALESCED_PIO; QEMU does the
// same for these two ports): a config-space read then costs one exit
// instead of two. The kernel's PCI scans read config space register by
// register, so boots without pci=noearly pay thousands fewer exits, each
// of which costs a few microseconds on hardware and far more nested (the
// lab: 0.3-0.7 ms each).
//
// A queued write must be applied before anything can observe it:
//
//   - every PIO and MMIO exit drains the ring before its dispatch
//     (vcpu.handle), so the access after a latch write sees it, whichever
//     vCPU made either;
//   - each vCPU drains it as it pauses (vcpu.paused), after its last
//     KVM_RUN: with every vCPU paused the ring is empty and stays so, and
//     the saved state (snapshots, checkpoints, migration) holds every
//     write the guest made.
//
// Drains are serialised by coalescer.mu; each vCPU reads the ring through
// its own mapping of the same page.
type coalescer struct {
	on      bool          // zones registered (set in New, read-only after)
	mu      sync.Mutex    // one drain at a time
	applied atomic.Uint64 // writes applied from the ring
}

// coalescedPorts are the port ranges whose writes KVM queues.
var coalescedPorts = []struct {
	port uint16
	size uint32
}{
	{PCIConfigBase, 4}, // CONFIG_ADDRESS (a dword; byte writes to 0xcf9-0xcfb fall in it too)
	{RTCBase, 1},       // the RTC's index
}

// setupCoalescedPIO registers coalescedPorts where KVM can queue port
// writes and vCPUs can map the ring; elsewhere every write exits, as
// before. A zone that registered makes draining necessary, even if a
// later one failed.
func (m *Machine) setupCoalescedPIO() {
	if !m.vm.CanCoalescePIO() {
		return
	}
	for _, z := range coalescedPorts {
		if err := m.vm.RegisterCoalescedPIO(z.port, z.size); err != nil {
			return
		}
		m.coal.on = true
	}
}

// CoalescedPIO reports whether KVM queues the guest's writes to the
// latch ports (0xcf8, 0x70) rather than exiting for each, and how many
// such writes the machine has applied from the queue.
func (m *Machine) CoalescedPIO() (on bool, applied uint64) {
	return m.coal.on, m.coal.applied.Load()
}

// drainCoalesced applies the queued writes, oldest first, to the buses.
func (m *Machine) drainCoalesced(r *kvmapi.CoalescedRing) {
	m.coal.mu.Lock()
	defer m.coal.mu.Unlock()
	n := r.Drain(func(e *kvmapi.CoalescedIO) {
		data := e.Data[:min(e.Len, uint32(len(e.Data)))]
		if e.PIO != 0 {
			m.pio.Write(e.Addr, data)
		} else {
			m.mmio.Write(e.Addr, data)
		}
	})
	m.coal.applied.Add(uint64(n))
}
