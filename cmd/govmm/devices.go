package main

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"

	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/virtio"
	"govmm/virtio/netback"
	"govmm/vmm"
)

// diskSpec is one parsed --disk.
type diskSpec struct {
	path      string
	readOnly  bool
	noDiscard bool // keep the image (and a standby's copy) allocated
}

func parseDisk(s string) (diskSpec, error) {
	parts := strings.Split(s, ",")
	d := diskSpec{path: parts[0]}
	if d.path == "" {
		return d, fmt.Errorf("--disk %q: empty path", s)
	}
	for _, opt := range parts[1:] {
		switch opt {
		case "ro":
			d.readOnly = true
		case "rw":
			d.readOnly = false
		case "nodiscard":
			d.noDiscard = true
		case "discard":
			d.noDiscard = false
		default:
			return d, fmt.Errorf("--disk %q: unknown option %q (want ro, rw, nodiscard or discard)", s, opt)
		}
	}
	return d, nil
}

// nic is a network backend with the MAC the guest will use.
type nic struct {
	backend virtio.NetBackend
	mac     net.HardwareAddr
	kind    string // "user" or "tap": a standby's must match
}

func (n nic) Close() error { return n.backend.Close() }

// devices parses the device flags, checks the disk images exist and opens
// the network backend (so that a missing image, a taken --publish port or
// a bad TAP name fails before the guest boots).
// guestNet is the kernel command line that configures the guest's eth0.
func (f *runFlags) devices() (nics []io.Closer, disks []diskSpec, guestNet string, err error) {
	for _, s := range f.disks {
		d, err := parseDisk(s)
		if err != nil {
			return nil, nil, "", err
		}
		// A missing image fails here, before KVM is asked for a VM.
		if _, err := os.Stat(d.path); err != nil {
			return nil, nil, "", fmt.Errorf("--disk %s: %w", d.path, err)
		}
		disks = append(disks, d)
	}
	mac := netback.DefaultMAC(f.name)
	if f.mac != "" {
		if mac, err = netback.ParseMAC(f.mac); err != nil {
			return nil, nil, "", fmt.Errorf("--mac: %w", err)
		}
	}
	if len(f.publish) > 0 && f.net != "user" {
		return nil, nil, "", fmt.Errorf("--publish needs --net user")
	}
	ip, gw := f.guestIP, f.guestGW
	switch {
	case f.net == "none":
	case f.net == "user":
		var pubs []netback.Publish
		for _, s := range f.publish {
			p, err := netback.ParsePublish(s)
			if err != nil {
				return nil, nil, "", fmt.Errorf("--publish: %w", err)
			}
			pubs = append(pubs, p)
		}
		u, err := netback.NewUser(netback.UserConfig{GuestMAC: mac, Publish: pubs})
		if err != nil {
			return nil, nil, "", err
		}
		nics = append(nics, nic{u, mac, "user"})
		if ip == "" {
			ip = netback.DefaultUserGuest.String() + "/" + fmt.Sprint(netback.DefaultUserNetwork.Bits())
		}
		if gw == "" {
			gw = netback.DefaultUserGateway.String()
		}
	case strings.HasPrefix(f.net, "tap:"):
		t, err := netback.OpenTAP(strings.TrimPrefix(f.net, "tap:"))
		if err != nil {
			return nil, nil, "", err
		}
		nics = append(nics, nic{t, mac, "tap"})
	default:
		return nil, nil, "", fmt.Errorf("--net %q: want user, tap:NAME or none", f.net)
	}
	if ip != "" {
		if _, err := netip.ParsePrefix(ip); err != nil {
			closeAll(nics)
			return nil, nil, "", fmt.Errorf("--guest-ip %q: want ADDR/PREFIX", ip)
		}
		guestNet = "govmm.ip=" + ip
	}
	if gw != "" {
		if _, err := netip.ParseAddr(gw); err != nil {
			closeAll(nics)
			return nil, nil, "", fmt.Errorf("--guest-gw %q: not an address", gw)
		}
		guestNet += " govmm.gw=" + gw
	}
	return nics, disks, strings.TrimSpace(guestNet), nil
}

// machineDevices are the devices attached to a machine, as replication
// and failover see them.
type machineDevices struct {
	closers  []io.Closer
	nics     []replicate.NIC      // one per NIC, its backend behind an output buffer
	diskLogs []*replicate.DiskLog // one per --disk
	// attrs describe the devices for the replication handshake, by device
	// ID: a standby whose machine differs is refused there.
	attrs map[string][]stream.Attr
}

// Close closes the devices (which own their backends).
func (d *machineDevices) Close() { closeAll(d.closers) }

// outputs are the NICs' output buffers.
func (d *machineDevices) outputs() []*replicate.OutputBuffer {
	var outs []*replicate.OutputBuffer
	for _, n := range d.nics {
		outs = append(outs, n.Out)
	}
	return outs
}

// fence gates the devices' output on lease and fences them (and m) with
// it; nil without a lease (no --witness).
func (d *machineDevices) fence(lease *witness.Lease, f *runFlags, m *vmm.Machine) *replicate.Fence {
	if lease == nil {
		return nil
	}
	return replicate.NewFence(replicate.FenceConfig{Lease: lease, Witness: f.witness, Machine: m,
		Outputs: d.outputs(), Disks: d.diskLogs})
}

// newMachine builds a machine and attaches the devices the flags asked
// for. On error it has released everything; on success the caller closes
// the devices, then the machine.
func newMachine(cfg vmm.Config, f *runFlags, nics []io.Closer, disks []diskSpec) (*vmm.Machine, *machineDevices, error) {
	m, err := vmm.New(cfg)
	if err != nil {
		closeAll(nics)
		return nil, nil, err
	}
	devs, err := attachDevices(m, f, nics, disks)
	if err != nil {
		devs.Close()
		m.Close()
		return nil, nil, err
	}
	return m, devs, nil
}

// attachDevices creates the virtio devices and puts them on the PCI bus.
//
// Every NIC's backend is wrapped in an output buffer that passes frames
// straight through until replication arms it (output commit).
func attachDevices(m *vmm.Machine, f *runFlags, nics []io.Closer, disks []diskSpec) (*machineDevices, error) {
	devs := &machineDevices{attrs: map[string][]stream.Attr{}}
	var guestIP netip.Addr
	if p, err := netip.ParsePrefix(f.guestIP); err == nil {
		guestIP = p.Addr()
	}
	for i, c := range nics {
		n := c.(nic)
		buf := replicate.NewOutputBuffer(n.backend, 0)
		devs.nics = append(devs.nics, replicate.NIC{Out: buf, MAC: n.mac, IP: guestIP})
		id := fmt.Sprintf("virtio-net%d", i)
		devs.attrs[id] = []stream.Attr{{Key: "mac", Value: n.mac.String()}, {Key: "backend", Value: n.kind}}
		dev, err := virtio.NewNet(m.Memory(), m, buf, virtio.NetConfig{
			ID: id, MAC: n.mac, UseIOEventFD: !f.noIOEventFD})
		if err != nil {
			closeAll(nics[i:])
			return devs, err
		}
		devs.closers = append(devs.closers, dev)
		if err := m.AddPCIDevice(dev); err != nil {
			closeAll(nics[i+1:])
			return devs, err
		}
	}
	for i, d := range disks {
		// A second, read-only handle: replication copies the disk from it.
		src, err := os.Open(d.path)
		if err != nil {
			return devs, fmt.Errorf("--disk %s: %w", d.path, err)
		}
		devs.closers = append(devs.closers, src)
		size, err := replicate.DiskSize(src)
		if err != nil {
			return devs, fmt.Errorf("--disk %s: %w", d.path, err)
		}
		log := replicate.NewDiskLog(src, size)
		devs.diskLogs = append(devs.diskLogs, log)
		id := fmt.Sprintf("virtio-blk%d", i)
		// The guest negotiates discard with the primary's device: the
		// standby's must offer the same (a read-only disk offers none).
		devs.attrs[id] = []stream.Attr{{Key: "size", Value: fmt.Sprint(size)}, {Key: "ro", Value: fmt.Sprint(d.readOnly)},
			{Key: "discard", Value: fmt.Sprint(!d.readOnly && !d.noDiscard)}}
		dev, err := virtio.NewBlock(m.Memory(), m, virtio.BlockConfig{
			ID: id, Path: d.path, ReadOnly: d.readOnly, NoDiscard: d.noDiscard, UseIOEventFD: !f.noIOEventFD,
			OnWrite: log.Record, OnZero: log.RecordZero, AllowWrite: log.AllowWrite})
		if err != nil {
			return devs, err
		}
		devs.closers = append(devs.closers, dev)
		if err := m.AddPCIDevice(dev); err != nil {
			return devs, err
		}
	}
	return devs, nil
}

func closeAll(cs []io.Closer) {
	for _, c := range cs {
		_ = c.Close()
	}
}
