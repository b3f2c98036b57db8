package kvmapi

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirtyRing is one vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING), mapped from
// the vCPU's fd. While a memory slot logs dirty pages, KVM pushes an entry
// for each page the vCPU dirties in it and write-protects nothing again
// until the VMM has collected the entry and VM.ResetDirtyRings re-arms it.
// When the ring is nearly full, KVM_RUN exits with ExitDirtyRingFull until
// entries are collected and reset.
//
// The ring is shared with the kernel. Collect reads each entry's flags
// with an atomic load (acquire) before its slot and offset, and hands the
// entry back with an atomic store (release), as KVM_CAP_DIRTY_LOG_RING_ACQ_REL
// requires. A DirtyRing is not safe for concurrent Collects.
type DirtyRing struct {
	mem  []byte     // the mapping
	gfns []DirtyGFN // mem as entries
	next uint32     // the next entry to collect, counting from the first ever
}

// MapDirtyRing maps the vCPU's dirty ring of entries entries (the ring
// size given to KVM_ENABLE_CAP, in bytes, divided by the 16 bytes of an
// entry). It must be called at most once; Close unmaps the ring.
func (v *VCPU) MapDirtyRing(entries int) (*DirtyRing, error) {
	if v.ring != nil {
		return nil, fmt.Errorf("vcpu %d: dirty ring already mapped", v.id)
	}
	size := entries * int(unsafe.Sizeof(DirtyGFN{}))
	mem, err := unix.Mmap(v.fd, int64(DirtyLogPageOffset*unix.Getpagesize()), size,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, &IoctlError{Op: "mmap dirty ring", Errno: err.(unix.Errno)}
	}
	// Sound: the mapping is page-aligned, entries*16 bytes long, and stays
	// mapped until Close, which drops the DirtyRing's view with it.
	gfns := unsafe.Slice((*DirtyGFN)(unsafe.Pointer(&mem[0])), entries)
	v.ring = &DirtyRing{mem: mem, gfns: gfns}
	return v.ring, nil
}

// Collect calls fn with the slot and page offset of each entry KVM has
// published since the last Collect, in ring order, and marks the entry
// for reset. It stops at the first entry KVM has not published yet, and
// returns how many it took. The pages are write-protected again only by
// the VM's next ResetDirtyRings.
func (r *DirtyRing) Collect(fn func(slot uint32, page uint64)) int {
	n := 0
	for {
		e := &r.gfns[r.next%uint32(len(r.gfns))]
		// Sound: Flags is a 4-aligned uint32 in the shared mapping; KVM
		// writes slot and offset before it sets the dirty flag.
		if atomic.LoadUint32(&e.Flags)&dirtyGFNDirty == 0 {
			return n
		}
		fn(e.Slot, e.Offset)
		atomic.StoreUint32(&e.Flags, dirtyGFNReset)
		r.next++
		n++
	}
}

// Holds says whether KVM has published at least n entries the VMM has not
// collected yet: it looks at the n-th one only (KVM publishes in ring
// order). Like Collect, it must not run concurrently with Collect.
func (r *DirtyRing) Holds(n int) bool {
	if n <= 0 {
		return true
	}
	if n > len(r.gfns) {
		return false
	}
	e := &r.gfns[(r.next+uint32(n)-1)%uint32(len(r.gfns))]
	return atomic.LoadUint32(&e.Flags)&dirtyGFNDirty != 0
}

// Entries is the ring's size in entries.
func (r *DirtyRing) Entries() int { return len(r.gfns) }

func (r *DirtyRing) unmap() error {
	err := unix.Munmap(r.mem)
	r.mem, r.gfns = nil, nil
	return err
}
