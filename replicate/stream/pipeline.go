package stream

import "govmm/vmm/container"

// pipeDepth is how many Pages frames a Sender keeps: one being filled by
// the checkpoint goroutine, the others being sealed and written by the
// sealer or waiting for it.
const pipeDepth = 3

// pipeline overlaps building a checkpoint's Pages frames with sending
// them: while the checkpoint goroutine copies pages into one slot, tests
// them for zero, checksums and compresses the section, the sealer
// goroutine seals (AES-256-GCM) and writes the frames of the others, on
// the other core where there is one. Frames leave in the order they were
// handed over; every other frame of the checkpoint goroutine (Begin,
// Disk, State, End) goes out directly once the frames handed over before
// it are written (flushAll), so the wire order is the call order, and
// EndCheckpoint returns, as before, with the whole checkpoint written.
//
// A slot belongs to the checkpoint goroutine while it is fill, then to the
// sealer from its hand-over on jobs until it comes back on free.
type pipeline struct {
	slots [pipeDepth]pageSlot
	fill  int      // the slot being filled
	jobs  chan int // slots handed to the sealer, in order
	free  chan int // slots the sealer is done with
}

// pageSlot is one Pages frame: the section, its codec and what goes on
// the wire (the section framed in place, or the codec's buffer).
type pageSlot struct {
	pages container.PageSection
	pc    *pageCodec
	wire  []byte
}

// startPipeline readies the slots and starts the sealer (after the
// handshake: it writes session frames).
func (s *Sender) startPipeline() {
	s.jobs, s.free = make(chan int, pipeDepth), make(chan int, pipeDepth)
	for i := range s.slots {
		s.slots[i].pages.Headroom = pagesHeader // a stored section goes out in place
		if i != s.fill {
			s.free <- i
		}
	}
	s.wg.Add(1)
	go s.sealLoop()
}

// filling is the slot the checkpoint goroutine fills.
func (s *Sender) filling() *pageSlot { return &s.slots[s.fill] }

// handOver passes the filled slot to the sealer and takes a free one
// (waiting for the sealer if all are in flight). It returns the stream's
// failure, if any: a frame that failed to go out fails the stream.
func (s *Sender) handOver() error {
	if err := s.Err(); err != nil {
		return err
	}
	s.jobs <- s.fill // never blocks: at most pipeDepth slots are out
	select {
	case s.fill = <-s.free:
	case <-s.done:
		return s.err
	}
	s.filling().pages.Reset()
	return s.Err()
}

// flushAll sends the section being filled, if any, and waits until the
// sealer has written every frame handed to it.
func (s *Sender) flushAll() error {
	if err := s.flushPages(); err != nil {
		return err
	}
	var held [pipeDepth]int
	for n := range pipeDepth - 1 {
		select {
		case held[n] = <-s.free:
		case <-s.done:
			return s.err
		}
	}
	for _, i := range held[:pipeDepth-1] {
		s.free <- i
	}
	return s.Err()
}

// sealLoop is the sealer: it writes the frames handed to it, in order,
// until the stream ends. After a failure it only returns the slots.
func (s *Sender) sealLoop() {
	defer s.wg.Done()
	for {
		select {
		case i := <-s.jobs:
			if s.Err() == nil {
				_ = s.send(framePages, s.slots[i].wire, false) // a failure fails the stream
			}
			s.free <- i
		case <-s.done:
			return
		}
	}
}
