package vmm

import "unsafe"

// abiView returns the bytes of a kernel ABI struct exactly as the kernel
// lays it out. Sound because the kvmapi state types are fixed-size, hold
// no pointers, spell out their padding, have their sizes and offsets
// pinned to <linux/kvm.h> by kvmapi's ABI test, and govmm runs only on
// little-endian x86-64: the view is the encoding the format documents.
func abiView[T any](v *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
}
