package netback

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"govmm/internal/netns"
	"govmm/virtio"
)

// Fields of struct virtio_net_hdr (virtio spec 5.1.6).
const (
	vnetFlagNeedsCsum = 1
	vnetGSONone       = 0
)

// vnetHdr builds a virtio_net_hdr_v1 (little-endian, as virtio 1.0 says).
func vnetHdr(flags uint8, csumStart, csumOffset uint16) []byte {
	h := make([]byte, VnetHdrLen)
	h[0] = flags
	h[1] = vnetGSONone
	binary.LittleEndian.PutUint16(h[6:8], csumStart)
	binary.LittleEndian.PutUint16(h[8:10], csumOffset)
	return h
}

var fakeHostMAC = net.HardwareAddr{0x02, 0x00, 0x00, 0x00, 0x00, 0x01}

// tapInNS opens a TAP in a new namespace, on its bridge, with frames for the
// guest on a channel.
func tapInNS(t *testing.T) (*netns.NS, *TAP, <-chan []byte) {
	t.Helper()
	ns := netns.New(t)
	var tap *TAP
	require.NoError(t, ns.Run(func() error {
		var err error
		tap, err = OpenTAP("gvtap0")
		return err
	}))
	t.Cleanup(func() { assert.NoError(t, tap.Close()) })
	require.Equal(t, "gvtap0", tap.Name())
	require.True(t, tap.VnetHdr())
	require.NoError(t, ns.Enslave(tap.Name()))

	frames := make(chan []byte, 64)
	tap.SetReceiver(func(f []byte) bool {
		select {
		case frames <- append([]byte(nil), f...):
			return true
		default:
			return false
		}
	})
	require.NoError(t, tap.Start())
	return ns, tap, frames
}

// waitFrame returns the next frame (vnet header included) that match accepts.
func waitFrame(t *testing.T, frames <-chan []byte, match func(hdr []byte, eth header.Ethernet) bool) ([]byte, header.Ethernet) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case f := <-frames:
			require.GreaterOrEqual(t, len(f), VnetHdrLen+header.EthernetMinimumSize)
			if eth := header.Ethernet(f[VnetHdrLen:]); match(f[:VnetHdrLen], eth) {
				return f[:VnetHdrLen], eth
			}
		case <-timeout:
			t.Fatal("expected frame did not arrive")
		}
	}
}

func addr4(a netip.Addr) net.IP { b := a.As4(); return net.IP(b[:]) }

// arpBridge asks the bridge for its MAC from the fake host and returns it.
func arpBridge(t *testing.T, ns *netns.NS, tap *TAP, frames <-chan []byte, hostIP netip.Addr) tcpip.LinkAddress {
	t.Helper()
	req := arpFrame(etherTypeARP, arpOpRequest, fakeHostMAC, addr4(hostIP), make(net.HardwareAddr, 6), addr4(ns.BridgeIP()))
	require.NoError(t, tap.Send(append(vnetHdr(0, 0, 0), req...)))
	hdr, eth := waitFrame(t, frames, func(_ []byte, eth header.Ethernet) bool {
		if eth.Type() != header.ARPProtocolNumber {
			return false
		}
		a := header.ARP(eth[header.EthernetMinimumSize:])
		return a.IsValid() && a.Op() == header.ARPReply
	})
	assert.Equal(t, vnetHdr(0, 0, 0)[:10], hdr[:10], "no offload on an ARP reply")
	assert.Equal(t, []byte{1, 0}, hdr[10:12], "num_buffers is 1")
	assert.Equal(t, tcpip.LinkAddress(fakeHostMAC), eth.DestinationAddress())
	a := header.ARP(eth[header.EthernetMinimumSize:])
	assert.Equal(t, []byte(addr4(ns.BridgeIP())), a.ProtocolAddressSender())
	assert.Equal(t, []byte(addr4(hostIP)), a.ProtocolAddressTarget())
	assert.Equal(t, []byte(fakeHostMAC), a.HardwareAddressTarget())
	return tcpip.LinkAddress(a.HardwareAddressSender())
}

func TestTAPBridgeAnswersARP(t *testing.T) {
	ns, tap, frames := tapInNS(t)
	hostIP := ns.BridgeIP().Next()
	bridgeMAC := arpBridge(t, ns, tap, frames, hostIP)
	out, err := ns.Command("cat", "/sys/class/net/"+netns.BridgeName+"/address").Output()
	require.NoError(t, err)
	assert.Equal(t, strings.TrimSpace(string(out)), bridgeMAC.String())
}

// udpFrame builds Ethernet+IPv4+UDP. With partial, the UDP checksum field
// holds only the pseudo-header sum, for the kernel to finish
// (VIRTIO_NET_HDR_F_NEEDS_CSUM); csum, if not 0, overrides the field.
func udpFrame(src, dst tcpip.LinkAddress, srcIP, dstIP netip.Addr, srcPort, dstPort uint16, payload string, partial bool, csum uint16) []byte {
	ipLen := header.IPv4MinimumSize + header.UDPMinimumSize + len(payload)
	f := make([]byte, header.EthernetMinimumSize+ipLen)
	header.Ethernet(f).Encode(&header.EthernetFields{SrcAddr: src, DstAddr: dst, Type: header.IPv4ProtocolNumber})
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	s, d := tcpip.AddrFrom4(srcIP.As4()), tcpip.AddrFrom4(dstIP.As4())
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(ipLen), TTL: 64, Protocol: uint8(header.UDPProtocolNumber), SrcAddr: s, DstAddr: d})
	ip.SetChecksum(^ip.CalculateChecksum())
	u := header.UDP(ip.Payload())
	udpLen := uint16(header.UDPMinimumSize + len(payload))
	u.Encode(&header.UDPFields{SrcPort: srcPort, DstPort: dstPort, Length: udpLen})
	copy(u.Payload(), payload)
	pseudo := header.PseudoHeaderChecksum(header.UDPProtocolNumber, s, d, udpLen)
	switch {
	case csum != 0:
		u.SetChecksum(csum)
	case partial:
		u.SetChecksum(pseudo)
	default:
		u.SetChecksum(^checksum.Checksum(u, pseudo))
	}
	return f
}

// TestTAPVnetHeader checks that the kernel reads our vnet header (a frame
// with a wrong UDP checksum is delivered only when the header says the
// checksum is ours to finish) and writes its own (a reply carries
// NEEDS_CSUM only after the guest accepts checksum offload).
func TestTAPVnetHeader(t *testing.T) {
	ns, tap, frames := tapInNS(t)
	hostIP := ns.BridgeIP().Next()
	bridgeMAC := arpBridge(t, ns, tap, frames, hostIP)
	require.NoError(t, ns.Command("ip", "neigh", "replace", hostIP.String(), "lladdr", fakeHostMAC.String(), "dev", netns.BridgeName).Run())

	pc, err := ns.ListenPacket("udp4", net.JoinHostPort(ns.BridgeIP().String(), "0"))
	require.NoError(t, err)
	defer pc.Close()
	port := uint16(pc.LocalAddr().(*net.UDPAddr).Port)
	const hostPort = 4000
	recv := func(d time.Duration) (string, error) {
		require.NoError(t, pc.SetReadDeadline(time.Now().Add(d)))
		buf := make([]byte, 1500)
		n, _, err := pc.ReadFrom(buf)
		return string(buf[:n]), err
	}
	send := func(hdr []byte, frame []byte) {
		t.Helper()
		require.NoError(t, tap.Send(append(hdr, frame...)))
	}
	const csumStart = header.EthernetMinimumSize + header.IPv4MinimumSize
	const csumOffset = 6 // checksum field within the UDP header

	// Partial checksum, flagged: the kernel takes it.
	send(vnetHdr(vnetFlagNeedsCsum, csumStart, csumOffset),
		udpFrame(tcpip.LinkAddress(fakeHostMAC), bridgeMAC, hostIP, ns.BridgeIP(), hostPort, port, "partial", true, 0))
	got, err := recv(10 * time.Second)
	require.NoError(t, err)
	assert.Equal(t, "partial", got)

	// A wrong checksum, not flagged: dropped.
	send(vnetHdr(0, 0, 0),
		udpFrame(tcpip.LinkAddress(fakeHostMAC), bridgeMAC, hostIP, ns.BridgeIP(), hostPort, port, "bad", false, 0x1234))
	// A full checksum, not flagged: taken, and it comes after the bad one.
	send(vnetHdr(0, 0, 0),
		udpFrame(tcpip.LinkAddress(fakeHostMAC), bridgeMAC, hostIP, ns.BridgeIP(), hostPort, port, "full", false, 0))
	got, err = recv(10 * time.Second)
	require.NoError(t, err)
	assert.Equal(t, "full", got, "the frame with the bad checksum was dropped")

	// Replies from the namespace to the guest.
	reply := func(payload string) ([]byte, header.UDP) {
		t.Helper()
		_, err := pc.WriteTo([]byte(payload), &net.UDPAddr{IP: addr4(hostIP), Port: hostPort})
		require.NoError(t, err)
		hdr, eth := waitFrame(t, frames, func(_ []byte, eth header.Ethernet) bool {
			if eth.Type() != header.IPv4ProtocolNumber {
				return false
			}
			ip := header.IPv4(eth[header.EthernetMinimumSize:])
			return ip.IsValid(len(ip)) && ip.Protocol() == uint8(header.UDPProtocolNumber) &&
				string(header.UDP(ip.Payload()).Payload()) == payload
		})
		return hdr, header.UDP(header.IPv4(eth[header.EthernetMinimumSize:]).Payload())
	}
	// No offloads accepted: the kernel finishes the checksum itself.
	hdr, u := reply("no offload")
	assert.Zero(t, hdr[0]&vnetFlagNeedsCsum, "flags %#x", hdr[0])
	src, dst := tcpip.AddrFrom4(ns.BridgeIP().As4()), tcpip.AddrFrom4(hostIP.As4())
	assert.True(t, u.IsChecksumValid(src, dst, checksum.Checksum(u.Payload(), 0)), "complete UDP checksum")

	// Checksum offload accepted: the kernel leaves the checksum of a local
	// socket's datagram to the guest, and says so in the header.
	require.NoError(t, tap.SetOffloads(virtio.Offloads{Csum: true, TSO4: true, TSO6: true, ECN: true, UFO: true}))
	hdr, _ = reply("offload")
	assert.Equal(t, uint8(vnetFlagNeedsCsum), hdr[0], "flags")
	assert.Equal(t, uint16(csumStart), binary.LittleEndian.Uint16(hdr[6:8]), "csum_start")
	assert.Equal(t, uint16(csumOffset), binary.LittleEndian.Uint16(hdr[8:10]), "csum_offset")

	// And back to none.
	require.NoError(t, tap.SetOffloads(virtio.Offloads{}))
	hdr, _ = reply("offload off")
	assert.Zero(t, hdr[0]&vnetFlagNeedsCsum, "flags %#x", hdr[0])
}

func TestTAPLifetime(t *testing.T) {
	ns := netns.New(t)
	require.NoError(t, ns.AddTap("persist0"))
	exists := func(name string) bool {
		var found bool
		require.NoError(t, ns.Run(func() error {
			_, err := net.InterfaceByName(name)
			found = err == nil
			return nil
		}))
		return found
	}
	for _, tt := range []struct {
		name     string
		survives bool
	}{
		{"created0", false}, // made by OpenTAP: goes with the fd
		{"persist0", true},  // made by ip tuntap: stays
	} {
		t.Run(tt.name, func(t *testing.T) {
			var tap *TAP
			require.NoError(t, ns.Run(func() error {
				var err error
				tap, err = OpenTAP(tt.name)
				return err
			}))
			assert.True(t, exists(tt.name))
			var flags string
			require.NoError(t, ns.Run(func() error {
				i, err := net.InterfaceByName(tt.name)
				if err == nil {
					flags = i.Flags.String()
				}
				return err
			}))
			assert.Contains(t, flags, "up", "OpenTAP brings the link up")

			tap.SetReceiver(func([]byte) bool { return true })
			require.NoError(t, tap.Start())
			done := make(chan error)
			go func() { done <- tap.Close() }()
			select {
			case err := <-done:
				require.NoError(t, err)
			case <-time.After(10 * time.Second):
				t.Fatal("Close did not end the reader")
			}
			require.NoError(t, tap.Close(), "idempotent")
			assert.Equal(t, tt.survives, exists(tt.name))
			assert.ErrorContains(t, tap.Send(make([]byte, 60)), "tap "+tt.name+": send: ")
		})
	}
}

func TestOpenTAPErrors(t *testing.T) {
	_, err := OpenTAP("this-name-is-too-long")
	require.EqualError(t, err, "tap this-name-is-too-long: interface name longer than 15 bytes")

	ns := netns.New(t)
	err = ns.Run(func() error {
		_, err := OpenTAP(netns.BridgeName) // exists, and is no TAP
		return err
	})
	require.Error(t, err)
	assert.True(t, strings.HasPrefix(err.Error(), "tap br0: attach (TUNSETIFF): "), err.Error())
}
