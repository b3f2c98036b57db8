//go:build cgo

// Package uabi reports the kernel's own view of the userfaultfd ABI,
// computed by the C compiler from <linux/userfaultfd.h>: struct sizes,
// field offsets, ioctl numbers and flags. Only guestmem's ABI test imports
// it; nothing at run time does.
package uabi

/*
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

#define S(t) { #t, sizeof(struct t) }
#define O(t, f) { #t "." #f, offsetof(struct t, f) }
#define I(x) { #x, x }

struct kv { const char *name; unsigned long value; };

struct kv kvs[] = {
	S(uffd_msg), S(uffdio_api), S(uffdio_range), S(uffdio_register), S(uffdio_writeprotect),
	O(uffd_msg, event), O(uffd_msg, arg.pagefault.flags), O(uffd_msg, arg.pagefault.address),
	O(uffdio_api, features), O(uffdio_api, ioctls),
	O(uffdio_register, mode), O(uffdio_register, ioctls), O(uffdio_writeprotect, mode),
	I(UFFD_API), I(UFFDIO_API), I(UFFDIO_REGISTER), I(UFFDIO_UNREGISTER), I(UFFDIO_WAKE),
	I(UFFDIO_WRITEPROTECT), I(USERFAULTFD_IOC_NEW),
	I(UFFD_FEATURE_PAGEFAULT_FLAG_WP), I(UFFDIO_REGISTER_MODE_WP),
	I(UFFDIO_WRITEPROTECT_MODE_WP), I(UFFDIO_WRITEPROTECT_MODE_DONTWAKE),
	I(UFFD_EVENT_PAGEFAULT), I(UFFD_PAGEFAULT_FLAG_WRITE), I(UFFD_PAGEFAULT_FLAG_WP),
	I(_UFFDIO_WRITEPROTECT),
	{ 0, 0 },
};
*/
import "C"

import "unsafe"

// Values maps "struct" (size), "struct.field" (offset) and macro names to
// what the C compiler says.
func Values() map[string]uint64 {
	m := make(map[string]uint64)
	for i := 0; ; i++ {
		kv := (*C.struct_kv)(unsafe.Add(unsafe.Pointer(&C.kvs[0]), uintptr(i)*unsafe.Sizeof(C.kvs[0])))
		if kv.name == nil {
			break
		}
		m[C.GoString(kv.name)] = uint64(kv.value)
	}
	return m
}
