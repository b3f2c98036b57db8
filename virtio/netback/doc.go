// Package netback holds the network backends behind virtio-net: the ways a
// guest's Ethernet frames reach the world outside it. Each implements
// virtio.NetBackend.
//
//   - User is user-mode networking on gVisor's netstack, like QEMU's slirp or
//     passt: the guest sits alone on 10.0.2.0/24 behind a gateway (10.0.2.2)
//     that terminates its TCP connections and UDP flows in the netstack and
//     relays them from ordinary host sockets, and that forwards published host
//     ports into the guest. It needs no privileges. Frames are bare Ethernet.
//   - TAP is a Linux TAP device opened with IFF_VNET_HDR: frames carry a
//     12-byte struct virtio_net_hdr_v1, so checksum and segmentation offloads
//     pass through the kernel unchanged.
//
// The package also builds the frames that announce a guest's MAC address after
// failover or migration (GARP, RARP) and parses and derives MAC addresses.
//
// It does not own the virtio-net device, the virtqueues or guest memory, and
// it does not hold output back for replication (replicate wraps a backend for
// that).
//
// Goroutines: each backend runs its own receive goroutine that calls the
// receiver installed by SetReceiver, one frame at a time. User also runs one
// accept loop per published port and two copy goroutines per relayed
// connection. Send may be called from any goroutine. Close stops every
// goroutine the backend started and waits for them.
package netback
