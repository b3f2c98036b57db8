package replicate

import (
	"errors"
	"fmt"
	"sync"

	"govmm/virtio"
)

// OutputBuffer holds the guest's network output until the checkpoint that
// covers it is acknowledged (invariant 1, output commit). It wraps the
// device's backend. Until Arm it passes frames straight through (the VM
// is not replicated, or not yet protected). Once armed, Send holds each
// frame in the open batch; Seal(n) at checkpoint n's cut closes the batch
// as epoch n's output; Release(n) sends every batch up to epoch n, in
// order, once the standby has acknowledged checkpoint n. Epoch numbers
// belong to the replicator: the buffer only checks that they increase.
// Received frames pass straight through: incoming traffic is not delayed.
//
// Concurrency: Send comes from the device's worker, Seal from the
// checkpoint path (vCPUs paused, devices quiesced), Release from the ack
// path. A mutex orders them; Release sends outside it so a slow backend
// does not stall the guest's Send.
type OutputBuffer struct {
	inner virtio.NetBackend

	mu         sync.Mutex // guards the fields below; taken inside sendMu
	current    [][]byte   // frames of the epoch the guest is producing output in
	sealed     []sealedEpoch
	lastSealed uint64 // epoch of the last Seal
	held       int    // bytes held, all epochs
	maxBytes   int
	dropped    uint64
	released   uint64
	bypass     bool // output commit off (unsafe, for benchmarks only)
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

// NewOutputBuffer wraps inner. Output passes straight through until Arm;
// once armed, at most maxBytes (0: DefaultMaxHeldBytes) are held.
func NewOutputBuffer(inner virtio.NetBackend, maxBytes int) *OutputBuffer {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxHeldBytes
	}
	return &OutputBuffer{inner: inner, maxBytes: maxBytes, passthrough: true}
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

// Seal ends the guest's current epoch at checkpoint epoch's cut: the
// output held since the previous cut is epoch's and waits for its ack.
// Epochs must increase, and the buffer must be armed.
func (b *OutputBuffer) Seal(epoch uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.passthrough:
		return fmt.Errorf("seal output of epoch %d: %w", epoch, ErrNotArmed)
	case epoch <= b.lastSealed:
		return fmt.Errorf("seal output of epoch %d after epoch %d: %w", epoch, b.lastSealed, ErrReleaseOrder)
	}
	b.sealed = append(b.sealed, sealedEpoch{epoch: epoch, frames: b.current})
	b.current = nil
	b.lastSealed = epoch
	return nil
}

// ErrNotArmed is returned by Seal on a buffer that holds nothing.
var ErrNotArmed = errors.New("output buffer not armed")

// ErrReleaseOrder is returned for a Seal whose epoch does not increase, or
// a Release of an epoch not sealed yet.
var ErrReleaseOrder = errors.New("output epochs out of order")

// Release sends the output of every sealed epoch up to and including
// epoch, in order. It returns the first send error (later frames of the
// same release are still attempted). A buffer that is not armed holds
// nothing, and releases nothing.
func (b *OutputBuffer) Release(epoch uint64) error {
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	if b.passthrough {
		b.mu.Unlock()
		return nil
	}
	if epoch > b.lastSealed {
		b.mu.Unlock()
		return fmt.Errorf("release output of epoch %d, last sealed %d: %w", epoch, b.lastSealed, ErrReleaseOrder)
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

// Arm turns output commit on at the cut of checkpoint epoch: frames from
// now on are held for the next Seal (of a later epoch). Until then (no
// standby, or the initial sync) output passes straight through: the guest
// is not yet protected, so there is nothing to hold it for.
func (b *OutputBuffer) Arm(epoch uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.current, b.sealed, b.held, b.lastSealed = nil, nil, 0, epoch
	b.passthrough = false
}

// Abandon ends output commit (the standby was lost, replication stopped
// or failed to start): held frames are dropped, never sent (their
// checkpoints were not acknowledged, and a standby that is only
// partitioned away may be running the guest from an earlier one; TCP
// retransmits what matters), and later frames pass straight through.
func (b *OutputBuffer) Abandon() {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := len(b.current)
	for _, e := range b.sealed {
		n += len(e.frames)
	}
	b.dropped += uint64(n)
	b.current, b.sealed, b.held = nil, nil, 0
	b.passthrough = true
}

// SetBypass turns output commit off (true) or on. Off is unsafe: clients
// may see output that a failover then forgets. For benchmarks only.
func (b *OutputBuffer) SetBypass(on bool) {
	b.mu.Lock()
	b.bypass = on
	b.mu.Unlock()
}

// BufferStats are the output buffer's counters. Dropped counts frames
// never sent: over the bound while held, or held when output commit ended.
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
