package replicate

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

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
// A gate (SetGate: the witness lease, through a Fence) is asked
// immediately before every frame leaves, released or passed through
// (invariant 8, exactly one emitter): while it says no, acknowledged
// epochs stay held (a later Release sends them) and passed-through frames
// are dropped, both counted. Fence stops all output for good.
//
// Concurrency: Send comes from the device's worker, Seal from the
// checkpoint path (vCPUs paused, devices quiesced), Release from the ack
// path, Fence from the fencing goroutine. A mutex orders them; frames are
// sent outside it so a slow backend does not stall the guest's Send.
// Lock order: sendMu, then emitMu, then mu.
type OutputBuffer struct {
	inner virtio.NetBackend
	gate  atomic.Pointer[func() bool] // nil: no gate (no witness)

	// emitMu is held for reading across each gate check and the send
	// that follows it, and for writing by Fence: once Fence returns, no
	// frame is on its way out.
	emitMu sync.RWMutex
	fenced atomic.Bool // set under emitMu's write lock; sticky

	mu         sync.Mutex // guards the fields below
	current    [][]byte   // frames of the epoch the guest is producing output in
	sealed     []sealedEpoch
	lastSealed uint64 // epoch of the last Seal
	acked      uint64 // the last epoch Release was told of
	held       int    // bytes held, all epochs
	maxBytes   int
	dropped    uint64
	released   uint64
	// heldNoLease counts releases the gate postponed; droppedNoLease the
	// passed-through frames it dropped; droppedFenced the frames dropped
	// by or after Fence.
	heldNoLease, droppedNoLease, droppedFenced uint64
	bypass                                     bool // output commit off (unsafe, for benchmarks only)
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

// ErrNoLease is returned by Release when the gate (the witness lease) did
// not let the acknowledged output out: it stays held for a later Release.
var ErrNoLease = errors.New("no valid witness lease: acknowledged output held")

// ErrOutputFenced is returned by Release on a fenced buffer.
var ErrOutputFenced = errors.New("output fenced: nothing is ever sent again")

// NewOutputBuffer wraps inner. Output passes straight through until Arm;
// once armed, at most maxBytes (0: DefaultMaxHeldBytes) are held.
func NewOutputBuffer(inner virtio.NetBackend, maxBytes int) *OutputBuffer {
	if maxBytes <= 0 {
		maxBytes = DefaultMaxHeldBytes
	}
	return &OutputBuffer{inner: inner, maxBytes: maxBytes, passthrough: true}
}

// SetGate makes every frame ask gate immediately before it leaves (nil:
// no gate). The gate must be cheap and never block: it is asked once per
// frame (a Fence's CanRelease reads a clock and a few atomics).
func (b *OutputBuffer) SetGate(gate func() bool) {
	if gate == nil {
		b.gate.Store(nil)
		return
	}
	b.gate.Store(&gate)
}

// open reports whether a frame may leave now. Call it with emitMu held
// for reading, immediately before the send.
func (b *OutputBuffer) open() bool {
	if b.fenced.Load() {
		return false
	}
	g := b.gate.Load()
	return g == nil || (*g)()
}

// VnetHdr implements virtio.NetBackend.
func (b *OutputBuffer) VnetHdr() bool { return b.inner.VnetHdr() }

// SetReceiver implements virtio.NetBackend: input is not buffered.
func (b *OutputBuffer) SetReceiver(fn func([]byte) bool) { b.inner.SetReceiver(fn) }

// Start implements virtio.NetBackend.
func (b *OutputBuffer) Start() error { return b.inner.Start() }

// GuestReady passes the guest driver's readiness to the inner backend when
// it wants it (virtio.GuestReadyNotifier).
func (b *OutputBuffer) GuestReady() {
	if r, ok := b.inner.(virtio.GuestReadyNotifier); ok {
		r.GuestReady()
	}
}

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

// Send implements virtio.NetBackend: the frame is copied and held, or,
// when not armed, passed through if the gate allows (else dropped).
func (b *OutputBuffer) Send(frame []byte) error {
	b.mu.Lock()
	if b.fenced.Load() {
		b.droppedFenced++
		b.mu.Unlock()
		return nil
	}
	if b.bypass || b.passthrough {
		b.mu.Unlock()
		return b.emit(frame)
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

// emit passes one frame through, if the gate allows; otherwise it is
// dropped and counted (TCP retransmits it).
func (b *OutputBuffer) emit(frame []byte) error {
	b.emitMu.RLock()
	defer b.emitMu.RUnlock()
	if !b.open() {
		b.mu.Lock()
		if b.fenced.Load() {
			b.droppedFenced++
		} else {
			b.droppedNoLease++
		}
		b.mu.Unlock()
		return nil
	}
	return b.inner.Send(frame)
}

// Release sends the output of every sealed epoch up to and including
// epoch (acknowledged by the standby; acks are cumulative), in order,
// each frame only if the gate allows at that moment. When the gate says
// no, the rest stays held and Release returns ErrNoLease: a later Release
// (the next ack) sends it. It returns the first send error otherwise
// (later frames are still attempted). A buffer that is not armed holds
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
	b.acked = max(b.acked, epoch)
	b.mu.Unlock()

	var first error
	for {
		done, err := b.releaseOne()
		switch {
		case done && err != nil:
			return err
		case done:
			return first
		case err != nil && first == nil:
			first = err
		}
	}
}

// releaseOne sends the next acknowledged frame, if the gate allows. done
// says there is nothing more to send now (err then says why, if not
// because all is sent). Each frame takes emitMu on its own, so a Fence
// waits for one frame at most.
func (b *OutputBuffer) releaseOne() (done bool, err error) {
	b.emitMu.RLock()
	defer b.emitMu.RUnlock()
	b.mu.Lock()
	if b.fenced.Load() {
		b.mu.Unlock()
		return true, ErrOutputFenced
	}
	for len(b.sealed) > 0 && len(b.sealed[0].frames) == 0 && b.sealed[0].epoch <= b.acked {
		b.sealed = b.sealed[1:]
	}
	if len(b.sealed) == 0 || b.sealed[0].epoch > b.acked {
		b.mu.Unlock()
		return true, nil
	}
	if !b.open() {
		b.heldNoLease++
		b.mu.Unlock()
		return true, ErrNoLease
	}
	e := &b.sealed[0]
	f := e.frames[0]
	e.frames[0] = nil
	e.frames = e.frames[1:]
	b.held -= len(f)
	b.released++
	b.mu.Unlock()
	return false, b.inner.Send(f)
}

// Arm turns output commit on at the cut of checkpoint epoch: frames from
// now on are held for the next Seal (of a later epoch). Until then (no
// standby, or the initial sync) output passes straight through: the guest
// is not yet protected, so there is nothing to hold it for.
func (b *OutputBuffer) Arm(epoch uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.current, b.sealed, b.held, b.lastSealed, b.acked = nil, nil, 0, epoch, epoch
	b.passthrough = false
}

// Abandon ends output commit (the standby was lost, replication stopped
// or failed to start): held frames are dropped, never sent (their
// checkpoints were not acknowledged, and a standby that is only
// partitioned away may be running the guest from an earlier one; TCP
// retransmits what matters), and later frames pass straight through
// (still asking the gate). A caller that wants acknowledged output the
// gate held back to leave first calls Release before.
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

// Fence stops the guest's output for good (a fenced VMM, DESIGN.md
// invariant 8): what is held is dropped, and every later Send or Release
// sends nothing. Once Fence returns, no frame is on its way out.
func (b *OutputBuffer) Fence() {
	b.emitMu.Lock()
	b.fenced.Store(true)
	b.emitMu.Unlock()
	b.mu.Lock()
	defer b.mu.Unlock()
	n := len(b.current)
	for _, e := range b.sealed {
		n += len(e.frames)
	}
	b.droppedFenced += uint64(n)
	b.current, b.sealed, b.held = nil, nil, 0
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
// HeldNoLease counts releases the gate postponed, DroppedNoLease the
// passed-through frames it dropped, DroppedFenced the frames dropped by
// or after Fence.
type BufferStats struct {
	HeldFrames, HeldBytes                      int
	Released, Dropped                          uint64
	HeldNoLease, DroppedNoLease, DroppedFenced uint64
	Fenced                                     bool
}

// Stats reports what is held now and what was released or dropped.
func (b *OutputBuffer) Stats() BufferStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	frames := len(b.current)
	for _, s := range b.sealed {
		frames += len(s.frames)
	}
	return BufferStats{HeldFrames: frames, HeldBytes: b.held, Released: b.released, Dropped: b.dropped,
		HeldNoLease: b.heldNoLease, DroppedNoLease: b.droppedNoLease, DroppedFenced: b.droppedFenced,
		Fenced: b.fenced.Load()}
}
