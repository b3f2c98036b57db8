package netback

import (
	"encoding/binary"
	"net"
)

// Frame constants for the announcement frames (RFC 826, RFC 903).
const (
	etherTypeARP  = 0x0806
	etherTypeRARP = 0x8035
	etherTypeIPv4 = 0x0800

	arpOpRequest        = 1
	arpOpReverseRequest = 3

	// minFrameLen is the shortest Ethernet frame without its FCS. Switches
	// would pad a shorter one; we pad it ourselves, as QEMU does.
	minFrameLen = 60
)

// GARP builds a gratuitous ARP request in which the guest announces that ip
// lives at mac: broadcast, with sender and target protocol address both ip.
// Switches relearn the port and neighbours update their ARP caches, which is
// how a standby takes over its primary's address at failover. It returns nil
// unless mac has 6 bytes and ip is IPv4.
func GARP(mac net.HardwareAddr, ip net.IP) []byte {
	ip4 := ip.To4()
	if len(mac) != 6 || ip4 == nil {
		return nil
	}
	return arpFrame(etherTypeARP, arpOpRequest, mac, ip4, make(net.HardwareAddr, 6), ip4)
}

// RARP builds the reverse ARP request that QEMU sends to announce a migrated
// guest: broadcast from mac, asking for mac's own IP address. Nobody needs to
// answer; its purpose is to make switches relearn which port mac is on, and
// it works without knowing the guest's IP address. It returns nil unless mac
// has 6 bytes.
func RARP(mac net.HardwareAddr) []byte {
	if len(mac) != 6 {
		return nil
	}
	return arpFrame(etherTypeRARP, arpOpReverseRequest, mac, net.IPv4zero.To4(), mac, net.IPv4zero.To4())
}

// arpFrame builds a broadcast Ethernet frame carrying an ARP-format packet
// for Ethernet and IPv4, padded to the minimum frame length.
func arpFrame(etherType, op uint16, sha net.HardwareAddr, spa net.IP, tha net.HardwareAddr, tpa net.IP) []byte {
	f := make([]byte, minFrameLen)
	copy(f[0:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	copy(f[6:12], sha)
	binary.BigEndian.PutUint16(f[12:14], etherType)
	a := f[14:]
	binary.BigEndian.PutUint16(a[0:2], 1) // hardware type: Ethernet
	binary.BigEndian.PutUint16(a[2:4], etherTypeIPv4)
	a[4] = 6 // hardware address length
	a[5] = 4 // protocol address length
	binary.BigEndian.PutUint16(a[6:8], op)
	copy(a[8:14], sha)
	copy(a[14:18], spa)
	copy(a[18:24], tha)
	copy(a[24:28], tpa)
	return f
}
