package kvmapi

import (
	"fmt"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// APIVersion is the only KVM API version that exists (KVM_GET_API_VERSION).
const APIVersion = 12

// System is an open /dev/kvm.
type System struct {
	fd int
}

// Open opens the KVM device (normally /dev/kvm) and checks its API version.
func Open(path string) (*System, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	s := &System{fd: fd}
	v, err := doVal(fd, "KVM_GET_API_VERSION", kvmGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, err
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("%s: kvm api version %d, want %d", path, v, APIVersion)
	}
	return s, nil
}

// Close closes the device. It is idempotent.
func (s *System) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return err
}

// CheckExtension returns KVM_CHECK_EXTENSION's answer for cap (0: absent).
func (s *System) CheckExtension(cap int) int {
	r, errno := ioctlVal(s.fd, kvmCheckExtension, uintptr(cap))
	if errno != 0 {
		return 0
	}
	return int(r)
}

// VCPUMmapSize is the size of each vCPU's kvm_run mapping.
func (s *System) VCPUMmapSize() (int, error) {
	return doVal(s.fd, "KVM_GET_VCPU_MMAP_SIZE", kvmGetVCPUMmapSize, 0)
}

// maxCPUIDEntries bounds the supported-CPUID query; KVM returns E2BIG when
// the buffer is short, and real hosts report well under 100 entries.
const maxCPUIDEntries = 256

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: every leaf that KVM can
// expose to a guest, with the bits it can virtualise.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	return getCPUID(s.fd, "KVM_GET_SUPPORTED_CPUID", kvmGetSupportedCPUID)
}

func getCPUID(fd int, op string, req uintptr) ([]CPUIDEntry, error) {
	type cpuid2 struct {
		Nent    uint32
		_       uint32
		Entries [maxCPUIDEntries]CPUIDEntry
	}
	var c cpuid2
	c.Nent = maxCPUIDEntries
	if _, err := doPtr(fd, op, req, unsafe.Pointer(&c)); err != nil {
		return nil, err
	}
	n := min(int(c.Nent), maxCPUIDEntries)
	return append([]CPUIDEntry(nil), c.Entries[:n]...), nil
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs that KVM saves and
// restores for a guest (what live migration must carry).
func (s *System) MSRIndexList() ([]uint32, error) {
	const max = 1024
	type msrList struct {
		N       uint32
		Indices [max]uint32
	}
	var l msrList
	l.N = max
	if _, err := doPtr(s.fd, "KVM_GET_MSR_INDEX_LIST", kvmGetMSRIndexList, unsafe.Pointer(&l)); err != nil {
		return nil, err
	}
	return append([]uint32(nil), l.Indices[:min(int(l.N), max)]...), nil
}

// CreateVM creates a virtual machine.
func (s *System) CreateVM() (*VM, error) {
	fd, err := doVal(s.fd, "KVM_CREATE_VM", kvmCreateVM, 0)
	if err != nil {
		return nil, err
	}
	size, err := s.VCPUMmapSize()
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	return &VM{fd: fd, sys: s, runSize: size}, nil
}

// IsPVM reports whether this host's KVM is kvm_pvm (the pagetable-based
// virtual machine some sandboxes provide): it runs non-PVM guests
// instruction by instruction, and it seldom stops a vCPU on a full dirty
// ring.
var IsPVM = sync.OnceValue(func() bool {
	_, err := os.Stat("/sys/module/kvm_pvm")
	return err == nil
})
