package vmm

import "unsafe"

// hostAddr is the userspace address of a guest memory mapping, for
// KVM_SET_USER_MEMORY_REGION. Sound because the mapping comes from mmap,
// not the Go heap: it never moves and lives until guestmem.Close.
func hostAddr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }
