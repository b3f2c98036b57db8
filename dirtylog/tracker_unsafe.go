package dirtylog

import "unsafe"

// hostAddr is the userspace address of a region's host mapping, for
// re-registering its memory slot (KVM_SET_USER_MEMORY_REGION takes it as
// a plain integer). Sound because the mapping comes from mmap in guestmem,
// not from the Go heap: it never moves, and it stays mapped until
// guestmem.Memory.Close, which the machine calls only after closing the
// VM. The caller checks that b is not empty.
func hostAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
