package stream

import (
	"fmt"
	"slices"
	"strings"

	"govmm/vmm/guestmem"
)

// GPA is a guest-physical address.
type GPA = guestmem.GPA

// PageSize is the unit of memory on the stream.
const PageSize = guestmem.PageSize

// Caps on the identity carried in the hello.
const (
	MaxRegions    = 64
	MaxNameLen    = 256
	MaxDevicesLen = 4096
	MaxVCPUs      = 1024
	// MaxMemory caps the announced layout (and so every staging area).
	MaxMemory = 1 << 40
)

// Region is one stretch of guest RAM, as in guestmem.Spec.
type Region struct {
	GPA  GPA
	Size uint64
}

// Identity describes the VM a stream is about. The sender announces its
// own; a receiver configured with one refuses any other (ErrMismatch), and
// every page address is checked against the sender's layout.
type Identity struct {
	Name    string
	Regions []Region // sorted by GPA, page-aligned, non-overlapping
	VCPUs   uint32
	Devices string // device kinds, e.g. "virtio-net,virtio-blk"; compared verbatim
}

// IsZero reports whether id is unset (a receiver that accepts any VM).
func (id Identity) IsZero() bool {
	return id.Name == "" && len(id.Regions) == 0 && id.VCPUs == 0 && id.Devices == ""
}

// Pages is the number of pages in the layout.
func (id Identity) Pages() uint64 {
	var n uint64
	for _, r := range id.Regions {
		n += r.Size / PageSize
	}
	return n
}

// Validate checks the caps and the layout's shape.
func (id Identity) Validate() error {
	if len(id.Name) > MaxNameLen {
		return fmt.Errorf("vm name: %d bytes, at most %d: %w", len(id.Name), MaxNameLen, ErrTooLarge)
	}
	if len(id.Devices) > MaxDevicesLen {
		return fmt.Errorf("device list: %d bytes, at most %d: %w", len(id.Devices), MaxDevicesLen, ErrTooLarge)
	}
	if id.VCPUs == 0 || id.VCPUs > MaxVCPUs {
		return fmt.Errorf("vcpu count %d not in 1..%d: %w", id.VCPUs, MaxVCPUs, ErrFrame)
	}
	if len(id.Regions) == 0 || len(id.Regions) > MaxRegions {
		return fmt.Errorf("%d memory regions, want 1..%d: %w", len(id.Regions), MaxRegions, ErrFrame)
	}
	var total uint64
	for i, r := range id.Regions {
		if r.Size == 0 || r.Size%PageSize != 0 || uint64(r.GPA)%PageSize != 0 {
			return fmt.Errorf("memory region %#x+%#x: not page-aligned: %w", uint64(r.GPA), r.Size, ErrFrame)
		}
		if uint64(r.GPA)+r.Size < uint64(r.GPA) || r.Size > MaxMemory {
			return fmt.Errorf("memory region %#x+%#x: wraps: %w", uint64(r.GPA), r.Size, ErrFrame)
		}
		if i > 0 {
			p := id.Regions[i-1]
			if r.GPA < p.GPA+GPA(p.Size) {
				return fmt.Errorf("memory region %#x: overlaps or precedes the one before: %w", uint64(r.GPA), ErrFrame)
			}
		}
		total += r.Size
		if total > MaxMemory {
			return fmt.Errorf("memory layout: more than %d GiB: %w", MaxMemory>>30, ErrTooLarge)
		}
	}
	return nil
}

// Contains reports whether the page at gpa is page-aligned and wholly inside
// one region.
func (id Identity) Contains(gpa GPA) bool {
	if uint64(gpa)%PageSize != 0 {
		return false
	}
	for _, r := range id.Regions {
		if gpa >= r.GPA && uint64(gpa-r.GPA) <= r.Size-PageSize {
			return true
		}
	}
	return false
}

// mismatch returns an ErrMismatch naming the first differing field, or nil.
func (id Identity) mismatch(peer Identity) error {
	switch {
	case id.Name != peer.Name:
		return fmt.Errorf("%w: vm name %q, peer has %q", ErrMismatch, id.Name, peer.Name)
	case !slices.Equal(id.Regions, peer.Regions):
		return fmt.Errorf("%w: memory layout %s, peer has %s", ErrMismatch, layoutString(id.Regions), layoutString(peer.Regions))
	case id.VCPUs != peer.VCPUs:
		return fmt.Errorf("%w: %d vcpus, peer has %d", ErrMismatch, id.VCPUs, peer.VCPUs)
	case id.Devices != peer.Devices:
		return fmt.Errorf("%w: devices %q, peer has %q", ErrMismatch, id.Devices, peer.Devices)
	}
	return nil
}

func layoutString(rs []Region) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, r := range rs {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%#x+%#x", uint64(r.GPA), r.Size)
	}
	b.WriteByte(']')
	return b.String()
}
