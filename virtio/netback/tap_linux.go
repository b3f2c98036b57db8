package netback

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"govmm/virtio"
)

// VnetHdrLen is the size of the header in front of every TAP frame: struct
// virtio_net_hdr_v1 (virtio spec 5.1.6), i.e. the legacy 10-byte header plus
// num_buffers.
const VnetHdrLen = 12

// tapRxBufLen holds the largest frame a TAP can hand us: a 64 KiB GSO packet
// with its Ethernet header, after the vnet header.
const tapRxBufLen = VnetHdrLen + 65550

// Offload flags of TUNSETOFFLOAD (linux/if_tun.h); x/sys/unix lacks them.
const (
	tunFCsum   = 0x01
	tunFTSO4   = 0x02
	tunFTSO6   = 0x04
	tunFTSOECN = 0x08
	tunFUFO    = 0x10
)

// TAP is a Linux TAP device opened with IFF_VNET_HDR. Every frame, both
// ways, carries a 12-byte struct virtio_net_hdr_v1 in front of the Ethernet
// frame, which the kernel honours (checksum and segmentation offload).
//
// If OpenTAP created the device, it disappears on Close; a persistent one
// made beforehand (ip tuntap add) stays.
type TAP struct {
	name string
	f    *os.File // nonblocking, in the Go netpoller, so Close ends a Read
	log  *slog.Logger

	receiver func([]byte) bool // set before Start, read by the reader only

	mu      sync.Mutex // guards started and closed
	started bool
	closed  bool
	done    chan struct{} // closed when the reader ends

	dropped atomic.Uint64
}

var (
	_ virtio.NetBackend    = (*TAP)(nil)
	_ virtio.OffloadSetter = (*TAP)(nil)
)

// OpenTAP opens the TAP device name in the calling thread's network
// namespace, creating it if it does not exist, with no offloads, and brings
// its link up. An empty name lets the kernel choose one (see Name). It needs
// CAP_NET_ADMIN, or a persistent device owned by the caller.
func OpenTAP(name string) (*TAP, error) {
	t, err := openTAP(name)
	if err != nil {
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	return t, nil
}

func openTAP(name string) (t *TAP, err error) {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, fmt.Errorf("interface name longer than %d bytes", unix.IFNAMSIZ-1)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return nil, fmt.Errorf("attach (TUNSETIFF): %w", err)
	}
	name = ifr.Name()
	// The kernel's default header is the legacy 10 bytes; virtio 1.0 has
	// num_buffers in it always (virtio spec 5.1.6).
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VnetHdrLen); err != nil {
		return nil, fmt.Errorf("set vnet header size (TUNSETVNETHDRSZ): %w", err)
	}
	// Until the guest accepts offloads, the kernel must hand us only
	// complete, checksummed frames.
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
		return nil, fmt.Errorf("set offloads (TUNSETOFFLOAD): %w", err)
	}
	if err := linkUp(name); err != nil {
		return nil, err
	}
	t = &TAP{
		name: name,
		// os.NewFile sees the nonblocking flag and registers the fd with
		// the netpoller.
		f:    os.NewFile(uintptr(fd), "/dev/net/tun"),
		log:  slog.Default().With("component", "netback", "backend", "tap", "tap", name),
		done: make(chan struct{}),
	}
	ok = true
	return t, nil
}

// linkUp sets IFF_UP on the interface, as `ip link set NAME up` does.
func linkUp(name string) error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("link up: socket: %w", err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("link up: %w", err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("link up: get flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("link up: set flags: %w", err)
	}
	return nil
}

// Name returns the interface's name.
func (t *TAP) Name() string { return t.name }

// VnetHdr implements virtio.NetBackend: frames carry a 12-byte
// virtio_net_hdr_v1.
func (t *TAP) VnetHdr() bool { return true }

// SetOffloads implements virtio.OffloadSetter: it tells the kernel which
// offloaded frames the guest accepts. Offloads the kernel would refuse
// without their prerequisite (segmentation without checksum offload, ECN
// without segmentation) are dropped, which is the safe direction: the guest
// then only gets frames it can take.
func (t *TAP) SetOffloads(o virtio.Offloads) error {
	// Not t.f.Fd(): it would put the fd back into blocking mode, and Close
	// could no longer end the reader.
	rc, err := t.f.SyscallConn()
	if err != nil {
		return fmt.Errorf("tap %s: set offloads: %w", t.name, err)
	}
	var ioErr error
	if err := rc.Control(func(fd uintptr) {
		ioErr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, tunOffloads(o))
	}); err != nil {
		return fmt.Errorf("tap %s: set offloads: %w", t.name, err)
	}
	if ioErr != nil {
		return fmt.Errorf("tap %s: set offloads (TUNSETOFFLOAD): %w", t.name, ioErr)
	}
	return nil
}

// tunOffloads maps the guest's accepted offloads to TUNSETOFFLOAD flags.
func tunOffloads(o virtio.Offloads) int {
	if !o.Csum {
		return 0
	}
	flags := tunFCsum
	if o.TSO4 {
		flags |= tunFTSO4
	}
	if o.TSO6 {
		flags |= tunFTSO6
	}
	if o.ECN && (o.TSO4 || o.TSO6) {
		flags |= tunFTSOECN
	}
	if o.UFO {
		flags |= tunFUFO
	}
	return flags
}

// SetReceiver implements virtio.NetBackend.
func (t *TAP) SetReceiver(fn func(frame []byte) bool) { t.receiver = fn }

// Dropped returns how many frames for the guest the receiver refused.
func (t *TAP) Dropped() uint64 { return t.dropped.Load() }

// Start implements virtio.NetBackend: it starts the reader goroutine.
func (t *TAP) Start() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.closed:
		return fmt.Errorf("tap %s: start: %w", t.name, os.ErrClosed)
	case t.started:
		return fmt.Errorf("tap %s: start: already started", t.name)
	case t.receiver == nil:
		return fmt.Errorf("tap %s: start: no receiver set", t.name)
	}
	t.started = true
	go t.readLoop()
	return nil
}

func (t *TAP) readLoop() {
	defer close(t.done)
	buf := make([]byte, tapRxBufLen)
	for {
		n, err := t.f.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				t.log.Error("tap reader stopped", "err", err)
			}
			return
		}
		if n < VnetHdrLen {
			continue // cannot happen with a vnet header set; never trust it
		}
		// The kernel writes only the legacy 10 bytes and skips num_buffers.
		// One read is one buffer; a device merging buffers rewrites it.
		buf[10], buf[11] = 1, 0
		if !t.receiver(buf[:n]) {
			t.dropped.Add(1)
		}
	}
}

// Send implements virtio.NetBackend: frame is a 12-byte virtio_net_hdr_v1
// followed by an Ethernet frame, written to the TAP in one write.
func (t *TAP) Send(frame []byte) error {
	if len(frame) < VnetHdrLen {
		return fmt.Errorf("tap %s: send: frame of %d bytes has no vnet header", t.name, len(frame))
	}
	if _, err := t.f.Write(frame); err != nil {
		return fmt.Errorf("tap %s: send: %w", t.name, err)
	}
	return nil
}

// Close implements virtio.NetBackend: it closes the device, which ends the
// reader, and waits for the reader.
func (t *TAP) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	started := t.started
	t.mu.Unlock()
	err := t.f.Close()
	if started {
		<-t.done
	}
	if err != nil {
		return fmt.Errorf("tap %s: close: %w", t.name, err)
	}
	return nil
}
