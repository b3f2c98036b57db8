package bench

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"govmm/replicate/stream"
)

// The ack suite's split mode (AckConfig.Split, govmm bench --split ack)
// runs the standby's end (the Receiver, and the bound's reader) in a
// process of its own, pinned to one CPU, and pins this process (the
// Sender, and the bound's writer) to another: a primary and a standby on
// two one-core hosts, joined by loopback. In one process the two ends
// share both cores and the Go scheduler's hand-offs (docs/STREAM.md,
// "Where the time goes at 1,000 pages"), which two hosts do not.
//
// The standby's end is `govmm bench --ack-standby-end` (AckStandbyEnd),
// which the suite starts for each point and talks to over the child's
// stdin and stdout: one line with the point ("PAGES KEY", KEY in hex or
// "-" unkeyed), answered by the listening addresses ("stream ADDR bound
// ADDR", the bound's address taking the bound's connection and the tuned
// bound's); then each "cpu" line is answered with the child's CPU time so
// far and its Receiver's time opening frames so far ("cpu NANOSECONDS
// open NANOSECONDS", stream.Stats.OpenTime, 0 before the stream is
// accepted). Closing its stdin ends it.

// AckStandbyEnd is the split ack suite's standby end, reading its
// point from in and answering on out (see above). It returns when in
// closes or ctx ends.
func AckStandbyEnd(ctx context.Context, in io.Reader, out io.Writer) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	lines := bufio.NewScanner(in)
	if !lines.Scan() {
		return fmt.Errorf("ack standby end: no point on stdin: %v", lines.Err())
	}
	n, key, c, err := parseAckPoint(lines.Text())
	if err != nil {
		return err
	}
	rcfg, _ := ackConfigs(n, key, c, stream.SendBufferAuto) // a receiver sends only acks
	aead, err := aeadOrNil(key, c)
	if err != nil {
		return err
	}
	sink, unmap, err := ackStandbySink(n)
	if err != nil {
		return err
	}
	rcfg.Sink = sink
	var running sync.WaitGroup // the Receiver's goroutine: the memory is unmapped after it
	defer func() { cancel(); running.Wait(); unmap() }()
	ln, err := stream.Listen("127.0.0.1:0", rcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer bl.Close()
	if _, err := fmt.Fprintf(out, "stream %s bound %s\n", ln.Addr(), bl.Addr()); err != nil {
		return err
	}
	failed := make(chan error, 3)
	var recv atomic.Pointer[stream.Receiver] // once accepted, for its open time
	running.Add(1)
	go func() {
		defer running.Done()
		r, err := ln.Accept(ctx)
		if err != nil {
			failed <- fmt.Errorf("ack standby end: accept: %w", err)
			return
		}
		recv.Store(r)
		defer r.Close()
		if err := r.Run(ctx); err != nil && ctx.Err() == nil {
			failed <- fmt.Errorf("ack standby end: %w", err)
		}
	}()
	go func() { // the bound's connection, then the tuned bound's
		for {
			c, err := bl.Accept()
			if err != nil {
				if ctx.Err() == nil {
					failed <- fmt.Errorf("ack standby end: accept bound: %w", err)
				}
				return
			}
			go func() {
				defer c.Close()
				ackEach(c, aead)
			}()
		}
	}()
	asked := make(chan struct{})
	go func() {
		defer close(asked)
		for lines.Scan() {
			if lines.Text() != "cpu" {
				failed <- fmt.Errorf("ack standby end: unknown request %q", lines.Text())
				return
			}
			var open time.Duration
			if r := recv.Load(); r != nil {
				open = r.Stats().OpenTime
			}
			if _, err := fmt.Fprintf(out, "cpu %d open %d\n", cpuNow(), open); err != nil {
				return
			}
		}
	}()
	select {
	case <-asked: // stdin closed: the suite is done with this point
		return nil
	case err := <-failed:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// parseAckPoint reads the point line "PAGES KEY CIPHER" (KEY and
// CIPHER "-" unkeyed).
func parseAckPoint(line string) (int, []byte, stream.Cipher, error) {
	f := strings.Fields(line)
	if len(f) != 3 {
		return 0, nil, 0, fmt.Errorf("ack standby end: point %q: want PAGES KEY CIPHER", line)
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= 0 {
		return 0, nil, 0, fmt.Errorf("ack standby end: point %q: bad page count", line)
	}
	if f[1] == "-" {
		if f[2] != "-" {
			return 0, nil, 0, fmt.Errorf("ack standby end: point %q: a cipher without a key", line)
		}
		return n, nil, 0, nil
	}
	key, err := hex.DecodeString(f[1])
	if err != nil {
		return 0, nil, 0, fmt.Errorf("ack standby end: point %q: bad key: %w", line, err)
	}
	c, err := stream.ParseCipher(f[2])
	if err != nil || c == stream.CipherAuto {
		return 0, nil, 0, fmt.Errorf("ack standby end: point %q: want cipher aegis-128x2, aegis-128l or aes-256-gcm", line)
	}
	return n, key, c, nil
}

// splitEnd is the parent's handle on a running standby end.
type splitEnd struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *bufio.Reader
	stream string // the Receiver's address
	bound  string // the bound reader's address
}

// startSplitEnd starts the standby end for n pages (keyed with key, or
// unkeyed if key is nil) from govmm, on CPU cpu: the child inherits the
// affinity of the thread that forks it.
func startSplitEnd(govmm string, cpu, n int, key []byte, c stream.Cipher, stderr io.Writer) (*splitEnd, error) {
	if govmm == "" {
		return nil, errors.New("ack --split: no govmm binary to run the standby end")
	}
	cmd := exec.Command(govmm, "bench", "--ack-standby-end")
	cmd.Stderr = stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := startOnCPU(cmd, cpu); err != nil {
		return nil, fmt.Errorf("ack --split: start the standby end: %w", err)
	}
	e := &splitEnd{cmd: cmd, stdin: stdin, stdout: bufio.NewReader(stdout)}
	k, cs := "-", "-"
	if key != nil {
		k, cs = hex.EncodeToString(key), c.String()
	}
	var line string
	if _, err = fmt.Fprintf(stdin, "%d %s %s\n", n, k, cs); err == nil {
		line, err = e.stdout.ReadString('\n')
	}
	if err == nil {
		var f []string
		if f = strings.Fields(line); len(f) == 4 && f[0] == "stream" && f[2] == "bound" {
			e.stream, e.bound = f[1], f[3]
		} else {
			err = fmt.Errorf("unexpected answer %q", line)
		}
	}
	if err != nil {
		e.close()
		return nil, fmt.Errorf("ack --split: standby end: %w", err)
	}
	return e, nil
}

// startOnCPU starts cmd from a thread pinned to cpu for the while.
func startOnCPU(cmd *exec.Cmd, cpu int) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var was, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &was); err != nil {
		return err
	}
	one.Set(cpu)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		return err
	}
	err := cmd.Start()
	if rerr := unix.SchedSetaffinity(0, &was); err == nil {
		err = rerr
	}
	return err
}

// cpu is the standby end's CPU time so far, user and system, and its
// Receiver's time opening frames so far.
func (e *splitEnd) cpu() (cpu, open time.Duration, err error) {
	if _, err := io.WriteString(e.stdin, "cpu\n"); err != nil {
		return 0, 0, err
	}
	line, err := e.stdout.ReadString('\n')
	if err != nil {
		return 0, 0, err
	}
	var c, o int64
	if n, err := fmt.Sscanf(line, "cpu %d open %d", &c, &o); err != nil || n != 2 {
		return 0, 0, fmt.Errorf("standby end's cpu: %q: want \"cpu NANOSECONDS open NANOSECONDS\" (%v)", line, err)
	}
	return time.Duration(c), time.Duration(o), nil
}

// close ends the standby end and waits for it.
func (e *splitEnd) close() error {
	e.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- e.cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		_ = e.cmd.Process.Kill()
		return fmt.Errorf("standby end did not end; killed: %v", <-done)
	}
}

// splitCPUs are the two CPUs of split mode, the first two this process
// may run on (sender's, standby's), and the whole set, to go back to.
func splitCPUs() (sender, standby int, all unix.CPUSet, err error) {
	if err = unix.SchedGetaffinity(0, &all); err != nil {
		return 0, 0, all, err
	}
	var cpus []int
	for c := 0; c < len(all)*64 && len(cpus) < 2; c++ {
		if all.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	if len(cpus) < 2 {
		return 0, 0, all, fmt.Errorf("ack --split needs two CPUs; this process may run on %d", all.Count())
	}
	return cpus[0], cpus[1], all, nil
}

// pinProcess sets the affinity of every thread of this process to set;
// threads started later inherit it from the thread that starts them.
func pinProcess(set unix.CPUSet) error {
	var first error
	err := eachTask(func(tid int) {
		if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) && first == nil {
			first = fmt.Errorf("pin thread %d: %w", tid, err)
		}
	})
	if err != nil {
		return err
	}
	return first
}

// eachTask calls f with the id of each thread of this process.
func eachTask(f func(tid int)) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			f(tid)
		}
	}
	return nil
}

// pinSplit pins this process to the first of split mode's two CPUs
// until undo is called, and says the other, the standby ends'.
func pinSplit() (standby int, undo func(), err error) {
	mine, theirs, all, err := splitCPUs()
	if err != nil {
		return 0, nil, err
	}
	var one unix.CPUSet
	one.Set(mine)
	if err := pinProcess(one); err != nil {
		_ = pinProcess(all)
		return 0, nil, err
	}
	return theirs, func() { _ = pinProcess(all) }, nil
}

// splitEnds are ackEnds split: a Sender and the bound's writer dialled
// to a standby end on CPU cpu, this process pinned to another by the
// caller (pinSplit).
func splitEnds(ctx context.Context, govmm string, cpu int, m ackMode, n int, stderr io.Writer) (*ackEnds, error) {
	key := m.key()
	end, err := startSplitEnd(govmm, cpu, n, key, m.cipher, stderr)
	if err != nil {
		return nil, err
	}
	undo := func() { _ = end.close() }
	_, scfg := ackConfigs(n, key, m.cipher, m.sendBuffer)
	s, err := stream.Dial(ctx, end.stream, scfg)
	if err != nil {
		undo()
		return nil, err
	}
	var d net.Dialer
	tx, err := d.DialContext(ctx, "tcp", end.bound)
	if err != nil {
		s.Close()
		undo()
		return nil, err
	}
	tuned, err := d.DialContext(ctx, "tcp", end.bound)
	if err == nil {
		err = tuned.(*net.TCPConn).SetWriteBuffer(tunedSendBuffer)
		if err != nil {
			tuned.Close()
		}
	}
	if err != nil {
		tx.Close()
		s.Close()
		undo()
		return nil, err
	}
	return &ackEnds{s: s, key: key, tx: tx, tuned: tuned,
		meter: func() (ackMeter, error) {
			t, open, err := end.cpu()
			return ackMeter{cpu: cpuNow() + t, standbyCPU: t, seal: s.Stats().SealTime, open: open}, err
		},
		close: func() { tx.Close(); tuned.Close(); s.Close(); undo() },
	}, nil
}
