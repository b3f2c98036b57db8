package kvmapi

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// coalescedPageOffset is where, in pages, the coalesced ring sits in a
// vCPU's mapping (KVM_COALESCED_MMIO_PAGE_OFFSET on x86; the value of
// KVM_CAP_COALESCED_MMIO says the same).
const coalescedPageOffset = 2

// CanCoalescePIO reports whether KVM queues port writes
// (KVM_CAP_COALESCED_PIO) in a ring that vCPUs map where CoalescedRing
// looks for it.
func (vm *VM) CanCoalescePIO() bool {
	return vm.CheckExtension(CapCoalescedPIO) > 0 && vm.CheckExtension(CapCoalescedMMIO) == coalescedPageOffset
}

// RegisterCoalescedPIO asks KVM to queue the guest's writes to the size
// I/O ports from port in the VM's coalesced ring instead of exiting for
// each (KVM_REGISTER_COALESCED_MMIO with the zone's pio set; needs
// KVM_CAP_COALESCED_PIO). The VMM applies them, in order, before it
// handles the next exit that could observe them (CoalescedRing.Drain).
// A write that does not fit the ring, or reaches past the zone, exits as
// usual. Reads always exit.
func (vm *VM) RegisterCoalescedPIO(port uint16, size uint32) error {
	z := coalescedZone{Addr: uint64(port), Size: size, PIO: 1}
	_, err := doPtr(vm.fd, "KVM_REGISTER_COALESCED_MMIO", kvmRegisterCoalesced, unsafe.Pointer(&z))
	return err
}

// CoalescedRing is the VM's ring of queued writes (struct
// kvm_coalesced_mmio_ring), one page shared with the kernel: KVM appends
// an entry and then moves Last on (under its own lock, whichever vCPU
// wrote); the VMM takes entries from First and moves it on. Every vCPU's
// mapping shows the same page.
//
// Drain reads Last with an atomic load (acquire: KVM fills the entry
// before it publishes Last) and hands each entry back with an atomic
// store of First (release: KVM may reuse the slot after it). A ring is
// not safe for concurrent Drains: the VMM serialises them.
type CoalescedRing struct {
	hdr  *coalescedRingHeader
	ents []CoalescedIO
}

// CoalescedRing returns the VM's coalesced ring as this vCPU's mapping
// shows it, or nil when the mapping has no such page (see
// VM.CanCoalescePIO).
func (v *VCPU) CoalescedRing() *CoalescedRing {
	page := unix.Getpagesize()
	off := coalescedPageOffset * page
	if len(v.run) < off+page {
		return nil
	}
	hdrSize := int(unsafe.Sizeof(coalescedRingHeader{}))
	n := (page - hdrSize) / int(unsafe.Sizeof(CoalescedIO{}))
	// Sound: the page lies inside the vCPU's mapping, which stays mapped
	// until Close; the header is at the page's start and the entries,
	// 8-aligned (24 bytes each), right after its 8 bytes.
	return &CoalescedRing{
		hdr:  (*coalescedRingHeader)(unsafe.Pointer(&v.run[off])),
		ents: unsafe.Slice((*CoalescedIO)(unsafe.Pointer(&v.run[off+hdrSize])), n),
	}
}

// Pending says whether KVM has queued writes the VMM has not taken yet:
// two loads, cheap enough to ask before every exit's dispatch.
func (r *CoalescedRing) Pending() bool {
	return atomic.LoadUint32(&r.hdr.First) != atomic.LoadUint32(&r.hdr.Last)
}

// Drain calls fn with each queued write, oldest first, and hands its slot
// back to KVM; it returns how many it took. fn must not keep e.
func (r *CoalescedRing) Drain(fn func(e *CoalescedIO)) int {
	n := 0
	for {
		first := atomic.LoadUint32(&r.hdr.First)
		last := atomic.LoadUint32(&r.hdr.Last)
		if first == last || int(first) >= len(r.ents) {
			return n
		}
		fn(&r.ents[first])
		atomic.StoreUint32(&r.hdr.First, (first+1)%uint32(len(r.ents)))
		n++
	}
}
