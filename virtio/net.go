package virtio

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
)

// virtio-net (virtio 1.x §5.1).
const (
	netFCsum      = 1 << 0  // VIRTIO_NET_F_CSUM
	netFGuestCsum = 1 << 1  // VIRTIO_NET_F_GUEST_CSUM
	netFMAC       = 1 << 5  // VIRTIO_NET_F_MAC
	netFGuestTSO4 = 1 << 7  // VIRTIO_NET_F_GUEST_TSO4
	netFGuestTSO6 = 1 << 8  // VIRTIO_NET_F_GUEST_TSO6
	netFGuestECN  = 1 << 9  // VIRTIO_NET_F_GUEST_ECN
	netFGuestUFO  = 1 << 10 // VIRTIO_NET_F_GUEST_UFO
	netFHostTSO4  = 1 << 11 // VIRTIO_NET_F_HOST_TSO4
	netFHostTSO6  = 1 << 12 // VIRTIO_NET_F_HOST_TSO6
	netFHostECN   = 1 << 13 // VIRTIO_NET_F_HOST_ECN
	netFHostUFO   = 1 << 14 // VIRTIO_NET_F_HOST_UFO
	netFMrgRxbuf  = 1 << 15 // VIRTIO_NET_F_MRG_RXBUF
	netFStatus    = 1 << 16 // VIRTIO_NET_F_STATUS

	netSLinkUp = 1 // VIRTIO_NET_S_LINK_UP

	// NetHdrSize is struct virtio_net_hdr_v1: flags u8, gso_type u8,
	// hdr_len, gso_size, csum_start, csum_offset, num_buffers (all u16).
	NetHdrSize = 12

	netHdrFNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	netHdrFDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID
	netGSONone       = 0
	netGSOTCPv4      = 1
	netGSOUDP        = 3
	netGSOTCPv6      = 4
	netGSOECN        = 0x80

	netRXQ = 0
	netTXQ = 1

	// maxFrame bounds one frame with its header: a 64 KiB TSO segment plus
	// Ethernet and VLAN headers.
	maxFrame = NetHdrSize + 65535 + 18

	// Frames that arrive while the guest has no receive buffer wait in a
	// queue this big (count and bytes); beyond it they are dropped.
	rxQueueFrames = 256
	rxQueueBytes  = 4 << 20

	netConfigSize = 10 // mac[6], status, max_virtqueue_pairs
)

// NetConfig configures a virtio-net device.
type NetConfig struct {
	ID           string           // device state ID, e.g. "virtio-net0"
	MAC          net.HardwareAddr // the guest's MAC, 6 bytes
	UseIOEventFD bool             // let KVM signal queue kicks without a vCPU exit
	Logger       *slog.Logger     // nil: slog.Default()
}

// Net is a virtio-net PCI function with one receive and one transmit
// queue. It implements pci.Device, pci.BARMapper and devstate.Stateful
// (through its transport). Quiesced, frames that arrive wait in the
// device's bounded queue, outside guest memory; its state does not
// include frames waiting for guest buffers (to the guest that is a lost
// packet), and restores onto a device built with the same NetConfig and a
// backend with the same VnetHdr.
type Net struct {
	*transport
	cfg     NetConfig
	mac     [6]byte
	backend NetBackend
	vnetHdr bool

	// rxMu guards the frames waiting for guest buffers. It is a leaf lock.
	rxMu    sync.Mutex
	rxq     [][]byte
	rxBytes int
	rxOpen  bool   // DRIVER_OK and not reset: frames are accepted
	rxGen   uint64 // bumped by reset, which empties rxq

	// Used by the worker only.
	chain    Chain
	rxChains []Chain
	txBuf    []byte

	rxDropped atomic.Uint64
	txDropped atomic.Uint64
	warnedTX  atomic.Bool
}

var (
	_ pci.Device        = (*Net)(nil)
	_ pci.BARMapper     = (*Net)(nil)
	_ devstate.Stateful = (*Net)(nil)
)

// NewNet builds the device, installs its receiver on backend and starts
// the backend. On success the device owns backend and closes it in Close;
// on failure the caller still owns it.
func NewNet(mem *guestmem.Memory, host pci.Host, backend NetBackend, cfg NetConfig) (*Net, error) {
	if cfg.ID == "" {
		return nil, fmt.Errorf("virtio-net: empty device id")
	}
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("virtio-net %s: mac %q is not 6 bytes", cfg.ID, cfg.MAC)
	}
	if backend == nil {
		return nil, fmt.Errorf("virtio-net %s: nil backend", cfg.ID)
	}
	n := &Net{cfg: cfg, backend: backend, vnetHdr: backend.VnetHdr()}
	copy(n.mac[:], cfg.MAC)
	var err error
	n.transport, err = newTransport(cfg.ID, mem, host, n, cfg.UseIOEventFD, cfg.Logger)
	if err != nil {
		return nil, err
	}
	backend.SetReceiver(n.receive)
	if err := backend.Start(); err != nil {
		n.transport.close()
		return nil, fmt.Errorf("virtio-net %s: start backend: %w", cfg.ID, err)
	}
	return n, nil
}

// MAC is the guest's MAC address.
func (n *Net) MAC() net.HardwareAddr { return append(net.HardwareAddr(nil), n.mac[:]...) }

// Dropped reports frames dropped on receive (no guest buffer, queue full,
// offload the guest did not accept) and on transmit (malformed frame,
// backend error).
func (n *Net) Dropped() (rx, tx uint64) { return n.rxDropped.Load(), n.txDropped.Load() }

// Close stops the device and closes the backend. Idempotent.
func (n *Net) Close() error {
	n.transport.close()
	if err := n.backend.Close(); err != nil {
		return fmt.Errorf("virtio-net %s: close backend: %w", n.cfg.ID, err)
	}
	return nil
}

func (n *Net) kind() string            { return "virtio-net" }
func (n *Net) deviceType() uint16      { return 1 }
func (n *Net) class() (uint8, uint8)   { return 0x02, 0x00 }
func (n *Net) numQueues() int          { return 2 }
func (n *Net) configSize() int         { return netConfigSize }
func (n *Net) writeConfig(int, []byte) {} // the MAC is read-only in virtio 1.x

func (n *Net) features() uint64 {
	f := uint64(FeatureVersion1 | FeatureIndirectDesc | netFMAC | netFStatus | netFMrgRxbuf)
	if n.vnetHdr {
		f |= netFCsum | netFGuestCsum | netFHostTSO4 | netFHostTSO6 | netFHostECN |
			netFGuestTSO4 | netFGuestTSO6 | netFGuestECN
	}
	return f
}

// checkFeatures enforces §5.1.3.1: segmentation offloads need checksum
// offload in the same direction, ECN needs TSO.
func (n *Net) checkFeatures(f uint64) bool {
	has := func(b uint64) bool { return f&b != 0 }
	switch {
	case has(netFGuestTSO4|netFGuestTSO6|netFGuestUFO) && !has(netFGuestCsum),
		has(netFGuestECN) && !has(netFGuestTSO4|netFGuestTSO6),
		has(netFHostTSO4|netFHostTSO6|netFHostUFO) && !has(netFCsum),
		has(netFHostECN) && !has(netFHostTSO4|netFHostTSO6):
		return false
	}
	return true
}

func (n *Net) readConfig(off int, data []byte) {
	var c [netConfigSize]byte
	copy(c[:], n.mac[:])
	binary.LittleEndian.PutUint16(c[6:], netSLinkUp)
	binary.LittleEndian.PutUint16(c[8:], 1)
	for i := range data {
		if off+i < len(c) {
			data[i] = c[off+i]
		}
	}
}

// activate opens receive and tells the backend what the guest accepts and
// that it is ready.
func (n *Net) activate(f uint64) {
	n.rxMu.Lock()
	n.rxOpen = true
	n.rxMu.Unlock()
	n.setOffloads(Offloads{
		Csum: f&netFGuestCsum != 0,
		TSO4: f&netFGuestTSO4 != 0,
		TSO6: f&netFGuestTSO6 != 0,
		ECN:  f&netFGuestECN != 0,
	})
	if r, ok := n.backend.(GuestReadyNotifier); ok {
		r.GuestReady()
	}
}

func (n *Net) reset() {
	n.rxMu.Lock()
	n.rxOpen = false
	n.rxq, n.rxBytes = nil, 0
	n.rxGen++
	n.rxMu.Unlock()
	n.setOffloads(Offloads{})
}

func (n *Net) setOffloads(o Offloads) {
	if s, ok := n.backend.(OffloadSetter); ok && n.vnetHdr {
		if err := s.SetOffloads(o); err != nil {
			n.log.Warn("set backend offloads", "err", err)
		}
	}
}

// netState is virtio-net's own part of the transport state: the
// configuration restore checks the device against.
type netState struct {
	MAC     []byte
	VnetHdr bool
}

func (s *netState) walk(c *devstate.Codec) {
	c.Bytes(&s.MAC, 6)
	c.Bool(&s.VnetHdr)
}

func (n *Net) saveDevice() []byte {
	s := netState{MAC: n.mac[:], VnetHdr: n.vnetHdr}
	return devstate.Encode(s.walk)
}

func (n *Net) checkDevice(saved []byte) error {
	var s netState
	if err := devstate.Decode(saved, s.walk); err != nil {
		return err
	}
	if !bytes.Equal(s.MAC, n.mac[:]) || s.VnetHdr != n.vnetHdr {
		return fmt.Errorf("mac %x (vnet header %v) saved, this device has %x (%v)", s.MAC, s.VnetHdr, n.mac, n.vnetHdr)
	}
	return nil
}

// receive is the backend's receiver: it copies the frame into the bounded
// queue and wakes the worker, which alone writes guest memory.
func (n *Net) receive(frame []byte) bool {
	if len(frame) > maxFrame || (n.vnetHdr && len(frame) < NetHdrSize) {
		n.rxDropped.Add(1)
		return false
	}
	n.rxMu.Lock()
	if !n.rxOpen || len(n.rxq) >= rxQueueFrames || n.rxBytes+len(frame) > rxQueueBytes {
		n.rxMu.Unlock()
		n.rxDropped.Add(1)
		return false
	}
	n.rxq = append(n.rxq, append([]byte(nil), frame...))
	n.rxBytes += len(frame)
	n.rxMu.Unlock()
	n.kick(netRXQ)
	return true
}

func (n *Net) process(q int) (bool, error) {
	if q == netRXQ {
		return n.processRX()
	}
	return n.processTX()
}

// processRX delivers the oldest waiting frame, if the guest has room.
func (n *Net) processRX() (bool, error) {
	n.rxMu.Lock()
	if len(n.rxq) == 0 {
		n.rxMu.Unlock()
		return false, nil
	}
	frame, gen := n.rxq[0], n.rxGen
	n.rxMu.Unlock()

	done, err := n.deliver(frame)
	if err != nil || !done {
		return false, err
	}
	n.rxMu.Lock()
	if n.rxGen == gen && len(n.rxq) > 0 { // not reset meanwhile
		n.rxq[0] = nil
		n.rxq = n.rxq[1:]
		n.rxBytes -= len(frame)
	}
	n.rxMu.Unlock()
	return true, nil
}

// rxAllowed checks a backend header against the offloads the guest
// accepted, and clears DATA_VALID if it did not accept checksum offload.
func rxAllowed(hdr []byte, f uint64) bool {
	if hdr[0]&netHdrFNeedsCsum != 0 && f&netFGuestCsum == 0 {
		return false
	}
	if f&netFGuestCsum == 0 {
		hdr[0] &^= netHdrFDataValid
	}
	if hdr[1]&netGSOECN != 0 && f&netFGuestECN == 0 {
		return false
	}
	switch hdr[1] &^ netGSOECN {
	case netGSONone:
		return true
	case netGSOTCPv4:
		return f&netFGuestTSO4 != 0
	case netGSOTCPv6:
		return f&netFGuestTSO6 != 0
	default:
		return false
	}
}

// deliver writes one frame into guest receive buffers (§5.1.6.4): a
// virtio_net_hdr_v1 then the frame, spread over as many chains as needed
// when MRG_RXBUF was accepted (num_buffers says how many), else into one
// chain that must hold it all. It returns false, leaving the ring as it
// was, when the guest has not posted enough buffers yet. Frames that can
// never be delivered are dropped and reported as done.
func (n *Net) deliver(frame []byte) (bool, error) {
	f := n.accepted()
	var hdr [NetHdrSize]byte
	payload := frame
	if n.vnetHdr {
		copy(hdr[:], frame)
		payload = frame[NetHdrSize:]
		if !rxAllowed(hdr[:], f) {
			n.rxDropped.Add(1)
			return true, nil
		}
	}
	total := uint64(NetHdrSize + len(payload))
	mrg := f&netFMrgRxbuf != 0
	q := n.ring(netRXQ)

	var k uint16 // chains taken
	var room uint64
	for room < total {
		if int(k) == len(n.rxChains) {
			n.rxChains = append(n.rxChains, Chain{})
		}
		ok, err := q.Pop(&n.rxChains[k])
		if err != nil {
			q.Unpop(k)
			return false, err
		}
		if !ok {
			q.Unpop(k)
			return false, nil
		}
		k++
		room += n.rxChains[k-1].WriteLen
		if !mrg && room < total {
			// A non-mergeable buffer too small for this frame: the frame
			// cannot be delivered as the guest set things up.
			q.Unpop(k)
			n.rxDropped.Add(1)
			return true, nil
		}
	}
	binary.LittleEndian.PutUint16(hdr[10:], k) // num_buffers
	parts := [2][]byte{hdr[:], payload}
	for i := range k {
		c := &n.rxChains[i]
		var written uint32
		for _, b := range c.Bufs {
			if !b.Write {
				continue
			}
			for uint32(0) < b.Len && (len(parts[0]) > 0 || len(parts[1]) > 0) {
				p := &parts[0]
				if len(*p) == 0 {
					p = &parts[1]
				}
				m := min(b.Len, uint32(len(*p)))
				if err := n.mem.WriteAt((*p)[:m], b.GPA); err != nil {
					return false, &ChainError{Reason: ErrBufferRange, Head: c.Head}
				}
				*p = (*p)[m:]
				b.GPA += guestmem.GPA(m)
				b.Len -= m
				written += m
			}
		}
		if err := q.Push(c.Head, written); err != nil {
			return false, err
		}
	}
	return true, nil
}

// txAllowed checks a guest TX header against the offloads it accepted.
func txAllowed(hdr []byte, f uint64) bool {
	if hdr[0]&netHdrFNeedsCsum != 0 && f&netFCsum == 0 {
		return false
	}
	if hdr[1]&netGSOECN != 0 && f&netFHostECN == 0 {
		return false
	}
	switch hdr[1] &^ netGSOECN {
	case netGSONone:
		return true
	case netGSOTCPv4:
		return f&netFHostTSO4 != 0
	case netGSOTCPv6:
		return f&netFHostTSO6 != 0
	default:
		return false
	}
}

// processTX sends one frame: the chain's readable bytes, a header then the
// Ethernet frame. Malformed frames are dropped, never passed on.
func (n *Net) processTX() (bool, error) {
	q := n.ring(netTXQ)
	ok, err := q.Pop(&n.chain)
	if !ok || err != nil {
		return false, err
	}
	c := &n.chain
	if c.ReadLen < NetHdrSize || c.ReadLen > maxFrame {
		n.dropTX("transmit frame of bad length", c.ReadLen)
		return true, q.Push(c.Head, 0)
	}
	if cap(n.txBuf) < maxFrame {
		n.txBuf = make([]byte, maxFrame)
	}
	buf := n.txBuf[:c.ReadLen]
	p := buf
	for _, b := range c.Bufs {
		if b.Write {
			break // device-writable buffers carry nothing to send
		}
		if err := n.mem.ReadAt(p[:b.Len], b.GPA); err != nil {
			return false, &ChainError{Reason: ErrBufferRange, Head: c.Head}
		}
		p = p[b.Len:]
	}
	frame := buf[NetHdrSize:]
	if n.vnetHdr {
		if !txAllowed(buf, n.accepted()) {
			n.dropTX("transmit header asks for an offload not negotiated", c.ReadLen)
			return true, q.Push(c.Head, 0)
		}
		binary.LittleEndian.PutUint16(buf[10:], 0) // num_buffers is RX only
		frame = buf
	}
	if err := n.backend.Send(frame); err != nil {
		n.txDropped.Add(1)
		n.log.Debug("backend send", "err", err)
	}
	return true, q.Push(c.Head, 0)
}

func (n *Net) dropTX(msg string, l uint64) {
	n.txDropped.Add(1)
	if !n.warnedTX.Swap(true) { // once per device: a guest can repeat it at will
		n.log.Warn(msg, "bytes", l)
	}
}
