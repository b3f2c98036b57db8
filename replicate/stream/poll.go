package stream

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultReadSpin is how long a receiver's reader polls for a
// checkpoint's next bytes before it sleeps (Config.ReadSpin).
const DefaultReadSpin = 100 * time.Microsecond

// MaxReadSpin caps Config.ReadSpin and Config.AckSpin: polling longer
// than this costs a core for less than it saves.
const MaxReadSpin = 10 * time.Millisecond

// CheckSpin checks a read spin (Config.ReadSpin) or an ack spin
// (Config.AckSpin) as a user gives it (0: never poll).
func CheckSpin(d time.Duration) error {
	if d < 0 || d > MaxReadSpin {
		return fmt.Errorf("want 0 (never poll) to %v", MaxReadSpin)
	}
	return nil
}

// poller lets a receiver's reader poll the connection inside a
// checkpoint instead of sleeping as soon as the socket is drained.
//
// Why: a checkpoint's bytes come in bursts (the sender writes a frame,
// builds the next, writes it), and a reader that drains the socket
// between two bursts sleeps in the network poller, its thread in
// epoll_wait, its CPU idle. The next burst must then wake it, and a
// wakeup costs the time for the kernel to schedule the thread again and,
// on a virtual machine whose idle vCPU halts, for the hypervisor to run
// that vCPU again: on this project's host (a VM) a one-byte round trip
// between two processes on two CPUs took 110-140 µs back to back and
// 370-410 µs after 50 ms of idleness, where the bytes themselves take a
// few µs. A standby pays it at every burst of every checkpoint, on the
// path to the ack. So between a Begin and its End (the stretch where the
// sender is known to be writing) a read that finds nothing tries again
// for up to spin before it sleeps, yielding the P between tries
// (runtime.Gosched), so that Run and the commit's copy, which may share
// the reader's one CPU on a small standby, run as before. Between
// checkpoints, when the sender may be idle for an epoch, the reader
// sleeps at once, as without it.
//
// The cost is CPU on the standby: up to spin per read that found the
// socket empty inside a checkpoint. On a slow link, where bytes trickle
// in, the reader may poll through most of a checkpoint's transfer.
//
// Owned by the reader goroutine (the endpoint's frame reader). A
// receiver's sets polling as it reads Begin and End frames; a sender's
// polls for acks instead, as Sender.pollsForAck chooses (Config.AckSpin:
// countingReader sets polling at each read).
type poller struct {
	raw     syscall.RawConn // nil: never poll (no descriptor, or disabled)
	spin    time.Duration
	polling bool // inside a checkpoint
}

// enable polls conn's reads for up to spin; a conn without a descriptor
// (syscall.Conn), or a spin of 0 or less, is never polled.
func (p *poller) enable(conn any, spin time.Duration) {
	sc, ok := conn.(syscall.Conn)
	if !ok || spin <= 0 {
		return
	}
	if raw, err := sc.SyscallConn(); err == nil {
		p.raw, p.spin = raw, spin
	}
}

// frame tells the poller what frame the reader read: a Begin starts a
// checkpoint, its End (or the stream's end) closes it.
func (p *poller) frame(t frameType) {
	switch t {
	case frameBegin:
		p.polling = p.raw != nil
	case frameEnd, frameGoodbye, frameError, frameHandover:
		p.polling = false
	}
}

// pollRead reads into b while polling: the bytes read, or 0 when it read
// none within spin, or met anything but bytes or an empty socket (an
// error, the end of the stream): the caller then reads the usual way,
// which sleeps until bytes arrive and reports errors as the connection
// does. It counts a read that found the socket empty and then bytes
// within spin (a sleep saved: Stats.PollHits), and one that gave up
// (Stats.PollMisses).
func (p *poller) pollRead(b []byte, ctr *counters) int {
	if !p.polling || len(b) == 0 {
		return 0
	}
	var n int
	waited := false
	deadline := time.Now().Add(p.spin)
	err := p.raw.Read(func(fd uintptr) bool {
		for {
			k, err := unix.Read(int(fd), b)
			switch {
			case err == nil && k > 0:
				n = k
				return true
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN && time.Now().Before(deadline):
				waited = true
				runtime.Gosched()
				continue
			}
			return true // empty for spin, an error or the end: read the usual way
		}
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		// A sender's reader woken to poll for an ack (countingReader):
		// no poll happened.
	case err != nil || n == 0:
		ctr.pollMisses.Add(1)
	case waited:
		ctr.pollHits.Add(1)
	}
	return n
}
