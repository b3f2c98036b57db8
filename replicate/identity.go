package replicate

import (
	"strings"

	"govmm/replicate/stream"
	"govmm/vmm"
)

// IdentityOf describes m for the stream's hello: its memory layout, vCPU
// count and devices, each with its kind and the attributes attrs gives for
// its ID (MAC, backend, disk size, read-only...). A receiver whose machine
// differs in any of them is refused at the handshake, not found out at
// failover.
func IdentityOf(m *vmm.Machine, name string, attrs map[string][]stream.Attr) stream.Identity {
	id := stream.Identity{Name: name, VCPUs: uint32(m.Config().CPUs)}
	for _, r := range m.Memory().Regions() {
		id.Regions = append(id.Regions, stream.Region{GPA: r.GPA, Size: r.Size})
	}
	for _, d := range m.Devices() { // "kind id"
		kind, devID, ok := strings.Cut(d, " ")
		if !ok {
			kind, devID = d, d
		}
		dev := stream.Device{ID: devID, Attrs: []stream.Attr{{Key: "kind", Value: kind}}}
		dev.Attrs = append(dev.Attrs, attrs[devID]...)
		id.Devices = append(id.Devices, dev)
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

// checkShape refuses a machine, built here to take the source's guest,
// that differs from the source's identity: memory layout, vCPUs, or any
// device or device attribute (a NIC's MAC or backend, a disk's size or
// read-only flag). The error (ErrMismatch) names the first difference,
// and the source is told it too.
func checkShape(m *vmm.Machine, attrs map[string][]stream.Attr, peer stream.Identity) error {
	return IdentityOf(m, "", attrs).Compare(peer, "on the standby", "on the source")
}
