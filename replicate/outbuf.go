package replicate

import (
	"errors"
	"sync"

	"govmm/virtio"
)

// OutputBuffer holds the guest's network output until the checkpoint that
// covers it is acknowledged (invariant 1, output commit). It wraps the
// device's backend: Send queues the frame in the current epoch; Seal ends
// the epoch at a checkpoint; Release(n) sends every frame of epochs up to
// n, in order, once the standby has acknowledged checkpoint n. Received
// frames pass straight through: incoming traffic is not delayed.
//
// Concurrency: Send comes from the device's worker, Seal from the
// checkpoint path (vCPUs paused, devices quiesced), Release from the ack
// reader. A mutex orders them; Release sends outside it so a slow backend
// does not stall the guest's Send.
type OutputBuffer struct {
	inner virtio.NetBackend

	mu       sync.Mutex
	epoch    uint64   // epoch the guest is producing output in
	current  [][]byte // frames of epoch
	sealed   []sealedEpoch
	held     int // bytes held, all epochs
	maxBytes int
	dropped  uint64
	released uint64
	bypass   bool // output commit off (unsafe, for benchmarks only)
	// passthrough: not replicating (yet, or any more); output is not held.
	passthrough bool

	sendMu sync.Mutex // serialises releases so frames leave in order
}

type sealedEpoch struct {
	epoch  uint64
	frames [][]byte
}

var _ virtio.NetBackend = (*OutputBuffer)(nil)

// DefaultMaxHeldBytes bounds the output held across epochs. Beyond it new
// frames are dropped (TCP retransmits them), never sent early.
const DefaultMaxHeldBytes = 64 << 20

// NewOutputBuffer wraps inner, holding output from epoch first on. A
// buffer made for a VM that is not replicated yet starts with
// Unprotect (pass-through) and is armed by StartEpochs.
func NewOutputBuffer(inner virtio.NetBackend, first uint64, maxBytes int) *OutputBuffer {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxHeldBytes
	}
	return &OutputBuffer{inner: inner, epoch: first, maxBytes: maxBytes}
}

// NewPassthroughBuffer wraps inner for a VM that may be replicated later:
// output passes through until StartEpochs.
func NewPassthroughBuffer(inner virtio.NetBackend) *OutputBuffer {
	b := NewOutputBuffer(inner, 0, 0)
	b.passthrough = true
	return b
}

// VnetHdr implements virtio.NetBackend.
func (b *OutputBuffer) VnetHdr() bool { return b.inner.VnetHdr() }

// SetReceiver implements virtio.NetBackend: input is not buffered.
func (b *OutputBuffer) SetReceiver(fn func([]byte) bool) { b.inner.SetReceiver(fn) }

// Start implements virtio.NetBackend.
func (b *OutputBuffer) Start() error { return b.inner.Start() }

// Close implements virtio.NetBackend. Held output is discarded: it was
// never acknowledged, so no client may see it.
func (b *OutputBuffer) Close() error {
	b.mu.Lock()
	b.current, b.sealed, b.held = nil, nil, 0
	b.mu.Unlock()
	return b.inner.Close()
}

// SetOffloads passes offload changes to the inner backend when it has them.
func (b *OutputBuffer) SetOffloads(o virtio.Offloads) error {
	if s, ok := b.inner.(virtio.OffloadSetter); ok {
		return s.SetOffloads(o)
	}
	return nil
}

// Send implements virtio.NetBackend: the frame is copied and held.
func (b *OutputBuffer) Send(frame []byte) error {
	b.mu.Lock()
	if b.bypass || b.passthrough {
		b.mu.Unlock()
		return b.inner.Send(frame)
	}
	if b.held+len(frame) > b.maxBytes {
		b.dropped++
		b.mu.Unlock()
		return nil
	}
	b.current = append(b.current, append([]byte(nil), frame...))
	b.held += len(frame)
	b.mu.Unlock()
	return nil
}

// Seal ends the current epoch (its output now waits for that epoch's ack)
// and returns its number; the guest's next output belongs to the next one.
func (b *OutputBuffer) Seal() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	e := b.epoch
	b.sealed = append(b.sealed, sealedEpoch{epoch: e, frames: b.current})
	b.current = nil
	b.epoch++
	return e
}

// ErrReleaseOrder is returned when acks arrive for an epoch not sealed.
var ErrReleaseOrder = errors.New("release of an epoch that was not sealed")

// Release sends the output of every sealed epoch up to and including
// epoch, in order. It returns the first send error (later frames of the
// same release are still attempted).
func (b *OutputBuffer) Release(epoch uint64) error {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	if epoch >= b.epoch {
		b.mu.Unlock()
		return ErrReleaseOrder
	}
	var out [][]byte
	n := 0
	for n < len(b.sealed) && b.sealed[n].epoch <= epoch {
		out = append(out, b.sealed[n].frames...)
		n++
	}
	b.sealed = b.sealed[n:]
	for _, f := range out {
		b.held -= len(f)
	}
	b.released += uint64(len(out))
	b.mu.Unlock()
	var first error
	for _, f := range out {
		if err := b.inner.Send(f); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// StartEpochs turns output commit on at a checkpoint's cut: frames from
// now on belong to epoch and wait for its ack. Until then (no standby, or
// the initial sync) output passes straight through: the guest is not yet
// protected, so there is nothing to hold it for.
func (b *OutputBuffer) StartEpochs(epoch uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.epoch = epoch
	b.current, b.sealed, b.held = nil, nil, 0
	b.passthrough = false
}

// Unprotect ends output commit (replication stopped, or the standby was
// lost under the continue policy): held frames are sent now, in order,
// and later ones pass straight through.
func (b *OutputBuffer) Unprotect() {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	var out [][]byte
	for _, s := range b.sealed {
		out = append(out, s.frames...)
	}
	out = append(out, b.current...)
	b.current, b.sealed, b.held = nil, nil, 0
	b.passthrough = true
	b.released += uint64(len(out))
	b.mu.Unlock()
	for _, f := range out {
		_ = b.inner.Send(f)
	}
}

// Abandon ends output commit after the standby was lost: held frames are
// dropped, never sent (their checkpoints were not acknowledged, and a
// standby that is only partitioned away may be running the guest from an
// earlier one; TCP retransmits what matters), and later frames pass
// straight through.
func (b *OutputBuffer) Abandon() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.current, b.sealed, b.held = nil, nil, 0
	b.passthrough = true
}

// Discard drops all held output (the standby is gone and policy says the
// guest must not talk unprotected, or the primary is failing over).
func (b *OutputBuffer) Discard() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.current, b.sealed, b.held = nil, nil, 0
}

// SetBypass turns output commit off (true) or on. Off is unsafe: clients
// may see output that a failover then forgets. For benchmarks only.
func (b *OutputBuffer) SetBypass(on bool) {
	b.mu.Lock()
	b.bypass = on
	b.mu.Unlock()
}

// BufferStats are the output buffer's counters.
type BufferStats struct {
	HeldFrames, HeldBytes int
	Released, Dropped     uint64
}

// Stats reports what is held now and what was released or dropped.
func (b *OutputBuffer) Stats() BufferStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	frames := len(b.current)
	for _, s := range b.sealed {
		frames += len(s.frames)
	}
	return BufferStats{HeldFrames: frames, HeldBytes: b.held, Released: b.released, Dropped: b.dropped}
}
