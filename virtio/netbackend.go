package virtio

// NetBackend moves Ethernet frames between a virtio-net device and the
// world outside the guest. Implementations live in virtio/netback (user-mode
// networking on gVisor's netstack, TAP); replication wraps one to hold the
// guest's output until its epoch commits.
type NetBackend interface {
	// VnetHdr reports whether frames in both directions carry a 12-byte
	// struct virtio_net_hdr_v1 in front of the Ethernet frame, which the
	// backend honours (checksum and segmentation offload, e.g. a TAP opened
	// with IFF_VNET_HDR). When false, frames are bare Ethernet and the
	// device negotiates no offloads.
	VnetHdr() bool

	// Send transmits one frame from the guest. It may block briefly for
	// backpressure and must not retain frame after returning.
	Send(frame []byte) error

	// SetReceiver installs the function that takes frames for the guest.
	// The backend calls it from its own goroutine(s), one frame at a time;
	// the function copies the frame before returning. It returns false if
	// the frame was dropped (no guest buffer in time). Set before Start.
	SetReceiver(func(frame []byte) bool)

	// Start begins delivering received frames.
	Start() error

	// Close stops the backend and releases its resources. Idempotent.
	Close() error
}

// Offloads are the receive offloads the guest driver accepted
// (VIRTIO_NET_F_GUEST_CSUM, _GUEST_TSO4, _GUEST_TSO6, _GUEST_ECN,
// _GUEST_UFO). A backend must not hand the guest a frame that relies on an
// offload the guest did not accept.
type Offloads struct {
	Csum, TSO4, TSO6, ECN, UFO bool
}

// GuestReadyNotifier is implemented by backends that act on the guest's
// driver being up: user networking accepts on its published ports only
// then, so that a client arriving earlier (while the guest boots, or at a
// standby before it takes over) waits in the host's listen queue instead
// of having its relayed SYN dropped and retried a second later. The device
// calls GuestReady when the driver sets DRIVER_OK and when a saved state
// with DRIVER_OK is restored; a later reset does not undo it.
type GuestReadyNotifier interface {
	GuestReady()
}

// OffloadSetter is implemented by backends that can produce offloaded
// frames (a TAP with IFF_VNET_HDR). The device calls SetOffloads when the
// guest driver sets DRIVER_OK, and with the zero value on reset.
type OffloadSetter interface {
	SetOffloads(Offloads) error
}
