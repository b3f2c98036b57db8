// Package kvmapi is a thin, typed layer over the Linux KVM API
// (Documentation/virt/kvm/api.rst): one Go type per file descriptor
// (System for /dev/kvm, VM, VCPU), the kernel ABI structs the ioctls
// exchange, the ioctl numbers, and the decoding of KVM_RUN exits.
//
// It owns no policy: it never logs or starts goroutines, and retries only
// EINTR on ioctls other than KVM_RUN, where it means nothing but "try
// again" (see doPtr). Every
// failed ioctl comes back as an *IoctlError wrapping the unix.Errno, so a
// caller can write errors.Is(err, unix.EAGAIN). KVM_RUN interrupted by a
// signal returns ErrInterrupted and is never re-entered here; only the
// caller's vCPU loop knows what to do next.
//
// Every ABI struct is pinned by TestABI to the sizes and offsets that the
// kernel's own <linux/kvm.h> gives (through cgo in internal/kabi), and every
// ioctl number to the value its _IO* macro computes.
//
// Concurrency: a System or VM may be used from any goroutine (the kernel
// serialises what needs it). A VCPU's ioctls must be issued from the OS
// thread that created it when it runs (KVM_RUN), which is the vmm package's
// job; its kvm_run page is shared with the kernel and read only by that
// thread.
package kvmapi
