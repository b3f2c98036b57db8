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
	MaxRegions   = 64
	MaxNameLen   = 256
	MaxDevices   = 64
	MaxDeviceID  = 64
	MaxAttrs     = 16
	MaxAttrKey   = 32
	MaxAttrValue = 256
	MaxVCPUs     = 1024
	// MaxHolderLen caps the witness holder name (as the witness does).
	MaxHolderLen = 256
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
	// Devices are the VM's devices in order, each with what a receiver's
	// machine must match to resume the guest (MAC, backend, disk size...).
	Devices []Device
	// Generation is, on a sender that uses a witness (docs/FENCING.md),
	// the generation of the VM it holds there, and Holder its name at the
	// witness; 0 and "" without a witness. A standby whose primary is lost
	// claims Generation+1 before it resumes the guest. They say which
	// incarnation of the VM this is, not what it looks like: Compare
	// ignores them, and the receiver's Verify decides about them.
	Generation uint64
	Holder     string
}

// Device is one device of the VM: its ID (as vmm names it, e.g.
// "virtio-blk0") and attributes compared verbatim, e.g. kind=virtio-blk,
// size=134217728, ro=false.
type Device struct {
	ID    string
	Attrs []Attr
}

// Attr is one device attribute.
type Attr struct{ Key, Value string }

// Attr returns the value of key, or "" if the device has none.
func (d Device) Attr(key string) string {
	for _, a := range d.Attrs {
		if a.Key == key {
			return a.Value
		}
	}
	return ""
}

// IsZero reports whether id is unset (a receiver that accepts any VM).
func (id Identity) IsZero() bool {
	return id.Name == "" && len(id.Regions) == 0 && id.VCPUs == 0 && len(id.Devices) == 0 &&
		id.Generation == 0 && id.Holder == ""
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
	if len(id.Devices) > MaxDevices {
		return fmt.Errorf("%d devices, at most %d: %w", len(id.Devices), MaxDevices, ErrTooLarge)
	}
	for _, d := range id.Devices {
		if d.ID == "" || len(d.ID) > MaxDeviceID || len(d.Attrs) > MaxAttrs {
			return fmt.Errorf("device %q: id of %d bytes (1..%d) with %d attributes (at most %d): %w",
				d.ID, len(d.ID), MaxDeviceID, len(d.Attrs), MaxAttrs, ErrTooLarge)
		}
		for _, a := range d.Attrs {
			if a.Key == "" || len(a.Key) > MaxAttrKey || len(a.Value) > MaxAttrValue {
				return fmt.Errorf("device %s: attribute %q: key of 1..%d and value of at most %d bytes: %w",
					d.ID, a.Key, MaxAttrKey, MaxAttrValue, ErrTooLarge)
			}
		}
	}
	if len(id.Holder) > MaxHolderLen || (id.Generation == 0 && id.Holder != "") {
		return fmt.Errorf("witness holder of %d bytes at generation %d (at most %d bytes, and none without a generation): %w",
			len(id.Holder), id.Generation, MaxHolderLen, ErrFrame)
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

// Mismatch returns an ErrMismatch naming the first field in which peer
// differs from id, or nil. An empty name in id matches any.
func (id Identity) Mismatch(peer Identity) error { return id.Compare(peer, "here", "on the peer") }

// Compare is Mismatch with the two sides named in the message: here for
// id, there for peer (e.g. "on the standby", "on the primary").
func (id Identity) Compare(peer Identity, here, there string) error {
	switch {
	case id.Name != "" && id.Name != peer.Name:
		return fmt.Errorf("%w: vm name %q %s, %q %s", ErrMismatch, id.Name, here, peer.Name, there)
	case !slices.Equal(id.Regions, peer.Regions):
		return fmt.Errorf("%w: memory layout %s %s, %s %s", ErrMismatch, layoutString(id.Regions), here, layoutString(peer.Regions), there)
	case id.VCPUs != peer.VCPUs:
		return fmt.Errorf("%w: %d vcpus %s, %d %s", ErrMismatch, id.VCPUs, here, peer.VCPUs, there)
	}
	mine, theirs := id.Devices, peer.Devices
	for i := range max(len(mine), len(theirs)) {
		switch {
		case i >= len(mine):
			return fmt.Errorf("%w: device %s %s is missing %s", ErrMismatch, theirs[i].ID, there, here)
		case i >= len(theirs):
			return fmt.Errorf("%w: device %s %s is missing %s", ErrMismatch, mine[i].ID, here, there)
		case mine[i].ID != theirs[i].ID:
			return fmt.Errorf("%w: device %d is %s %s, %s %s", ErrMismatch, i, mine[i].ID, here, theirs[i].ID, there)
		}
		d, p := mine[i], theirs[i]
		for _, a := range d.Attrs {
			if v := p.Attr(a.Key); v != a.Value {
				return fmt.Errorf("%w: device %s: %s %q %s, %q %s", ErrMismatch, d.ID, a.Key, a.Value, here, v, there)
			}
		}
		for _, a := range p.Attrs {
			if d.Attr(a.Key) == "" && a.Value != "" {
				return fmt.Errorf("%w: device %s: %s \"\" %s, %q %s", ErrMismatch, d.ID, a.Key, here, a.Value, there)
			}
		}
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
