package replicate

import (
	"fmt"
	"strings"

	"govmm/replicate/stream"
	"govmm/vmm"
)

// IdentityOf describes m for the stream's hello: its memory layout, vCPU
// count and devices. A destination of another shape is refused there.
func IdentityOf(m *vmm.Machine, name string) stream.Identity {
	id := stream.Identity{Name: name, VCPUs: uint32(m.Config().CPUs), Devices: strings.Join(m.Devices(), ",")}
	for _, r := range m.Memory().Regions() {
		id.Regions = append(id.Regions, stream.Region{GPA: r.GPA, Size: r.Size})
	}
	return id
}

// MemSize is the guest RAM an identity announces.
func MemSize(id stream.Identity) uint64 {
	var n uint64
	for _, r := range id.Regions {
		n += r.Size
	}
	return n
}

// checkShape refuses a destination machine that does not match the
// source's identity.
func checkShape(m *vmm.Machine, peer stream.Identity) error {
	mine := IdentityOf(m, peer.Name)
	if fmt.Sprint(mine.Regions) != fmt.Sprint(peer.Regions) {
		return fmt.Errorf("%w: memory layout %v, the source has %v", vmm.ErrStateMismatch, mine.Regions, peer.Regions)
	}
	if mine.VCPUs != peer.VCPUs {
		return fmt.Errorf("%w: %d vcpus, the source has %d", vmm.ErrStateMismatch, mine.VCPUs, peer.VCPUs)
	}
	if mine.Devices != peer.Devices {
		return fmt.Errorf("%w: devices %q, the source has %q", vmm.ErrStateMismatch, mine.Devices, peer.Devices)
	}
	return nil
}
