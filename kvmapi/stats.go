package kvmapi

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Stats is a binary statistics file of a vCPU or VM (KVM_GET_STATS_FD,
// KVM API 4.134): KVM's own counters, such as "exits" (every VM exit,
// including the many KVM handles without returning to userspace: halts,
// interrupts, its in-kernel devices). The descriptors are read once; each
// Read reads the current value.
type Stats struct {
	fd      int
	dataOff int64
	offsets map[string]uint32 // stat name -> offset of its first u64 in the data block
}

// statsHeader is struct kvm_stats_header.
type statsHeader struct {
	Flags      uint32
	NameSize   uint32
	NumDesc    uint32
	IDOffset   uint32
	DescOffset uint32
	DataOffset uint32
}

// statsDesc is struct kvm_stats_desc without its trailing name.
type statsDesc struct {
	Flags      uint32
	Exponent   int16
	Size       uint16
	Offset     uint32
	BucketSize uint32
}

// statsMaxDescs bounds what Stats accepts from the kernel before it
// allocates (the kernel has about a hundred vCPU stats).
const statsMaxDescs = 4096

// Stats opens the vCPU's statistics file. It fails on kernels before 5.14.
func (v *VCPU) Stats() (*Stats, error) {
	fd, err := doVal(v.fd, "KVM_GET_STATS_FD", kvmGetStatsFD, 0)
	if err != nil {
		return nil, err
	}
	s, err := parseStats(fd)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_STATS_FD: %w", err)
	}
	return s, nil
}

func parseStats(fd int) (*Stats, error) {
	var h statsHeader
	hb := make([]byte, unsafe.Sizeof(h))
	if _, err := unix.Pread(fd, hb, 0); err != nil {
		return nil, fmt.Errorf("read header: %w", err)
	}
	if err := binary.Read(bytes.NewReader(hb), binary.LittleEndian, &h); err != nil {
		return nil, err
	}
	if h.NumDesc > statsMaxDescs || h.NameSize == 0 || h.NameSize > 256 {
		return nil, fmt.Errorf("implausible header: %d descriptors, names of %d bytes", h.NumDesc, h.NameSize)
	}
	descSize := int(unsafe.Sizeof(statsDesc{})) + int(h.NameSize)
	descs := make([]byte, int(h.NumDesc)*descSize)
	if _, err := unix.Pread(fd, descs, int64(h.DescOffset)); err != nil {
		return nil, fmt.Errorf("read descriptors: %w", err)
	}
	s := &Stats{fd: fd, dataOff: int64(h.DataOffset), offsets: make(map[string]uint32, h.NumDesc)}
	for i := 0; i < int(h.NumDesc); i++ {
		d := descs[i*descSize : (i+1)*descSize]
		var sd statsDesc
		if err := binary.Read(bytes.NewReader(d), binary.LittleEndian, &sd); err != nil {
			return nil, err
		}
		name := d[unsafe.Sizeof(sd):]
		if n := bytes.IndexByte(name, 0); n >= 0 {
			name = name[:n]
		}
		s.offsets[string(name)] = sd.Offset
	}
	return s, nil
}

// Has reports whether the file has a statistic of that name.
func (s *Stats) Has(name string) bool { _, ok := s.offsets[name]; return ok }

// Read returns the current value of the named statistic (its first
// element, for the few that are arrays).
func (s *Stats) Read(name string) (uint64, error) {
	off, ok := s.offsets[name]
	if !ok {
		return 0, fmt.Errorf("kvm stats: no statistic %q", name)
	}
	var b [8]byte
	if _, err := unix.Pread(s.fd, b[:], s.dataOff+int64(off)); err != nil {
		return 0, fmt.Errorf("kvm stats: read %s: %w", name, err)
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Close closes the statistics file. It is idempotent.
func (s *Stats) Close() error {
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	return err
}
