package replicate

import (
	"context"
	"fmt"
	"sync"

	"govmm/replicate/stream"
	"govmm/vmm/guestmem"
)

// Transport carries checkpoints to a standby and brings its acks back.
// *stream.Sender is the real one; NewNullTransport is the benchmarks'
// standby that is not there.
//
// BeginCheckpoint, SendPage, SendState and EndCheckpoint belong to the
// checkpoint goroutine; the rest may be called from any goroutine.
type Transport interface {
	BeginCheckpoint(epoch uint64, kind stream.Kind) error
	SendPage(gpa guestmem.GPA, page []byte) error
	// SendStablePage is SendPage for a page that stays unchanged, in
	// place, until EndCheckpoint returns or a call fails: the staging
	// buffer's pages, which the stream may then send without copying.
	SendStablePage(gpa guestmem.GPA, page []byte) error
	// SendSummedPage is SendStablePage for a page whose PageSum its
	// copy into the staging buffer took (guestmem.CopyPageSummed), which
	// stays as it is with the page: the stream tests it for zero and
	// sums it from ps instead of reading it again. ps nil: it is
	// SendStablePage.
	SendSummedPage(gpa guestmem.GPA, page []byte, ps *guestmem.PageSum) error
	SendDisk(disk int, off int64, data []byte) error
	// SendDiskZero sends n zero bytes at off: a zero run, no data.
	SendDiskZero(disk int, off, n int64) error
	SendState(state []byte) error
	EndCheckpoint() error
	// Acked is the last acknowledged epoch; WaitAck waits until epoch is
	// acknowledged, the transport fails (its error) or ctx ends.
	Acked() uint64
	WaitAck(ctx context.Context, epoch uint64) error
	// Stats counts what went over the wire.
	Stats() stream.Stats
	// Done is closed when the transport has failed or been closed; Err
	// says why (nil after a local Close).
	Done() <-chan struct{}
	Err() error
	Close() error
}

var _ Transport = (*stream.Sender)(nil)

// nullTransport ships checkpoints nowhere and acknowledges each one as it
// ends: it measures the cost of checkpointing without the transfer. The
// guest it "protects" is not protected at all.
type nullTransport struct {
	mu      sync.Mutex // guards the fields below
	acked   uint64
	ackedCh chan struct{} // closed and replaced at each ack
	open    uint64        // epoch of the open checkpoint, 0 if none
	closed  bool
	done    chan struct{}
}

// NewNullTransport returns a Transport to no standby at all, for
// benchmarks: every checkpoint is taken, timed and acknowledged at once,
// and nothing is sent. A guest replicated through it is NOT protected.
func NewNullTransport() Transport {
	return &nullTransport{ackedCh: make(chan struct{}), done: make(chan struct{})}
}

func (t *nullTransport) BeginCheckpoint(epoch uint64, kind stream.Kind) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return fmt.Errorf("begin checkpoint %d: %w", epoch, stream.ErrClosed)
	}
	t.open = epoch
	return nil
}

func (t *nullTransport) SendPage(guestmem.GPA, []byte) error       { return nil }
func (t *nullTransport) SendStablePage(guestmem.GPA, []byte) error { return nil }
func (t *nullTransport) SendSummedPage(guestmem.GPA, []byte, *guestmem.PageSum) error {
	return nil
}
func (t *nullTransport) SendDisk(int, int64, []byte) error    { return nil }
func (t *nullTransport) SendDiskZero(int, int64, int64) error { return nil }
func (t *nullTransport) SendState([]byte) error               { return nil }

func (t *nullTransport) EndCheckpoint() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.open == 0 {
		return fmt.Errorf("end checkpoint: none open: %w", stream.ErrProtocol)
	}
	t.acked, t.open = t.open, 0
	close(t.ackedCh)
	t.ackedCh = make(chan struct{})
	return nil
}

func (t *nullTransport) Acked() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.acked
}

func (t *nullTransport) WaitAck(ctx context.Context, epoch uint64) error {
	for {
		t.mu.Lock()
		acked, ch := t.acked, t.ackedCh
		t.mu.Unlock()
		if acked >= epoch {
			return nil
		}
		select {
		case <-ch:
		case <-t.done:
			return fmt.Errorf("wait for ack of epoch %d: %w", epoch, stream.ErrClosed)
		case <-ctx.Done():
			return fmt.Errorf("wait for ack of epoch %d: %w", epoch, ctx.Err())
		}
	}
}

func (t *nullTransport) Stats() stream.Stats   { return stream.Stats{} }
func (t *nullTransport) Done() <-chan struct{} { return t.done }
func (t *nullTransport) Err() error            { return nil }

func (t *nullTransport) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		t.closed = true
		close(t.done)
	}
	return nil
}
