package netback

import (
	"context"
	"errors"
	"fmt"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/link/ethernet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// linkMTU is the largest IP packet either side sends: the guest has no
	// offloads on a bare-Ethernet backend, so 1500 as on any Ethernet.
	linkMTU = 1500

	// linkQueueLen bounds the frames the netstack may queue for the guest.
	// Beyond it the netstack's frames are dropped, and TCP retransmits.
	linkQueueLen = 1024
)

// errShortFrame is returned for a frame too short to hold an Ethernet header.
var errShortFrame = errors.New("frame shorter than an ethernet header")

// frameLink is the netstack's link layer as a pair of frame streams: inject
// puts an Ethernet frame into the stack, run hands the stack's frames to a
// function. It is gVisor's channel endpoint under its Ethernet endpoint, so
// the stack adds and strips Ethernet headers and answers ARP itself.
type frameLink struct {
	ch *channel.Endpoint
	ep stack.LinkEndpoint // what the NIC is created on
}

func newFrameLink(mac tcpip.LinkAddress) *frameLink {
	// The ethernet endpoint subtracts its header from the child's MTU.
	ch := channel.New(linkQueueLen, linkMTU+header.EthernetMinimumSize, mac)
	return &frameLink{ch: ch, ep: ethernet.New(ch)}
}

// inject copies frame into the stack. The stack processes it on the calling
// goroutine.
func (l *frameLink) inject(frame []byte) error {
	if len(frame) < header.EthernetMinimumSize {
		return fmt.Errorf("%w: %d bytes", errShortFrame, len(frame))
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithData(frame), // copies
	})
	defer pkt.DecRef()
	// The ethernet endpoint reads the protocol from the frame itself.
	l.ch.InjectInbound(0, pkt)
	return nil
}

// run hands each frame the stack sends to deliver until ctx is done or the
// link is closed. deliver must copy the frame: its buffer is reused.
func (l *frameLink) run(ctx context.Context, deliver func(frame []byte)) {
	scratch := make([]byte, 0, linkMTU+header.EthernetMinimumSize)
	for {
		pkt := l.ch.ReadContext(ctx)
		if pkt == nil {
			return
		}
		scratch = scratch[:0]
		for _, s := range pkt.AsSlices() {
			scratch = append(scratch, s...)
		}
		pkt.DecRef()
		deliver(scratch)
	}
}

// close discards queued frames and refuses new ones.
func (l *frameLink) close() { l.ch.Close() }

// tcpipError converts a netstack error at the boundary: tcpip.Error is not
// an error.
func tcpipError(op string, err tcpip.Error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %s", op, err)
}
