package stream

import "sync"

// recvDepth is how many frames a Receiver holds at once: the one Run is
// staging, and the ones its reader has read, opened and decoded ahead.
const recvDepth = 3

// recvPipe overlaps reading with staging on a Receiver: its reader
// goroutine reads frame N+1 off the connection, opens it (AES-256-GCM, or
// the CRC32C of an unkeyed session), decompresses, decodes and sums it
// (frameReader.sumFrame), while
// Run stages frame N into the sinks, verifies an End or commits. Frames
// reach Run in wire order, and a read failure reaches it after every
// frame read before it, as if Run had read them itself: what is committed
// and when, the acks and every verdict are as without the pipe. Each
// frame aliases a slot of its own (rxSlot), which belongs to the reader
// from its hand-out on free until it comes back on got, then to Run until
// Run returns it on free.
type recvPipe struct {
	slots [recvDepth]rxSlot
	got   chan rxItem // frames read, in order, then at most one failure
	free  chan int    // slots Run is done with
	wg    sync.WaitGroup
}

// rxItem is one frame read ahead, or the read's failure.
type rxItem struct {
	f     *frame
	slot  int
	start int64 // stream offset of the frame (for errors)
	err   error
}

// startReader starts the reader goroutine. It ends once the stream does
// (the connection closed, or the endpoint done); Run waits for it on the
// pipe's wg before it returns.
func (r *Receiver) startReader() *recvPipe {
	// got holds every slot's frame and a failure besides: the reader
	// never blocks on it.
	p := &recvPipe{got: make(chan rxItem, recvDepth+1), free: make(chan int, recvDepth)}
	p.slots[0] = *r.fr.cur // the handshake's buffers
	for i := range p.slots {
		p.free <- i
	}
	p.wg.Add(1)
	go r.readLoop(p)
	return p
}

// readLoop is the reader goroutine: it reads into each free slot in turn
// until a read fails (a clean end of stream included) or the stream is
// done, and always hands Run that end as its last item: Run waits for
// nothing else, so a stream that fails while the reader waits for a slot
// must still reach it. It never blocks on got: at most recvDepth frames
// and one failure are out. It
// listens (silence counts) only while it waits for the sender's bytes
// with a slot to put them in: while every slot waits for Run (staging,
// OnCommit, syncing disks), the time is ours, not the sender's.
func (r *Receiver) readLoop(p *recvPipe) {
	defer p.wg.Done()
	for {
		var i int
		select {
		case i = <-p.free:
		case <-r.done:
			p.got <- rxItem{slot: -1, start: r.fr.off, err: r.err}
			return
		}
		r.fr.cur = &p.slots[i]
		r.listen()
		f, err := r.fr.next()
		r.quiet()
		if err == nil {
			r.cr.frame(f.typ)
		}
		p.got <- rxItem{f: f, slot: i, start: r.fr.start, err: err}
		if err != nil {
			return
		}
	}
}
