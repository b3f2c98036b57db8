package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"govmm/kvmapi"
)

// kickSignal interrupts KVM_RUN. The Go runtime already handles SIGURG
// (preemption) with a handler that is harmless for us, so sending it to a
// vCPU thread makes KVM_RUN return EINTR without side effects.
const kickSignal = unix.SIGURG

type reqKind int

const (
	reqPause reqKind = iota
	reqResume
	reqDo
)

type vcpuReq struct {
	kind  reqKind
	fn    func(id int, fd *kvmapi.VCPU) error // reqDo
	reply chan error
}

// vcpu is one virtual CPU. Its goroutine owns fd and its OS thread for its
// whole life; everything else talks to it through reqs and kick.
type vcpu struct {
	m    *Machine
	id   int
	fd   *kvmapi.VCPU
	fdp  atomic.Pointer[kvmapi.VCPU] // fd, published for kick
	tid  atomic.Int32                // OS thread id, 0 until set up
	pid  int
	reqs chan vcpuReq

	cpuid []kvmapi.CPUIDEntry // as set at setup; read by SaveState while paused

	// resetsAtRun is the machine's dirty-ring reset count as this vCPU
	// last entered KVM_RUN (dirtyRingFull); its own thread's only.
	resetsAtRun uint64
	// ringTick, on kvm_pvm with dirty rings, kicks this thread out of
	// KVM_RUN every ringTickEvery of its CPU time, to look at the rings
	// (cputimer.go); its own thread's only.
	ringTick *cpuTimer
	// coal is the machine's coalesced ring through this vCPU's mapping
	// (coalesced.go), nil without it; drained under the machine's lock.
	coal *kvmapi.CoalescedRing

	exits [kvmapi.NumExitReasons]atomic.Uint64 // exits that reached run, by reason
	stats atomic.Pointer[kvmapi.Stats]         // KVM's own counters; nil before 5.14
}

func newVCPU(m *Machine, id int) *vcpu {
	return &vcpu{m: m, id: id, pid: unix.Getpid(), reqs: make(chan vcpuReq, 4)}
}

// kick makes KVM_RUN return soon. immediate_exit goes first so a signal
// landing just before KVM_RUN is not lost.
func (c *vcpu) kick() {
	tid := c.tid.Load()
	if tid == 0 {
		return // not started: it checks done and reqs before its first run
	}
	if fd := c.loadFD(); fd != nil {
		fd.SetImmediateExit(true)
	}
	_ = unix.Tgkill(c.pid, int(tid), kickSignal)
}

// loadFD returns the fd once created, for kick.
func (c *vcpu) loadFD() *kvmapi.VCPU { return c.fdp.Load() }

// loop is the vCPU goroutine: set up on its own thread, wait for release,
// run until the machine stops.
func (c *vcpu) loop(setup chan<- error, release <-chan struct{}) {
	defer c.m.wg.Done()
	// The thread stays locked and dies with the goroutine: KVM state and
	// signal masks make it unfit for other goroutines.
	runtime.LockOSThread()
	err := c.setup()
	if err == nil {
		c.tid.Store(int32(unix.Gettid()))
	}
	setup <- err
	<-release
	if err != nil {
		return
	}
	if c.ringTick != nil {
		defer c.ringTick.stop()
	}
	select {
	case <-c.m.done:
		return
	default:
	}
	if err := c.run(); err != nil {
		c.m.finish(Result{Status: 1, Reason: "vcpu error"}, err)
	}
}

func (c *vcpu) setup() error {
	fd, err := c.m.vm.CreateVCPU(c.id)
	if err != nil {
		return fmt.Errorf("vcpu %d: create: %w", c.id, err)
	}
	c.fd = fd
	c.fdp.Store(fd)
	if c.m.coal.on {
		if c.coal = fd.CoalescedRing(); c.coal == nil {
			return fmt.Errorf("vcpu %d: KVM queues port writes but its mapping has no coalesced ring", c.id)
		}
	}
	if err := c.m.addDirtyRing(fd); err != nil {
		return fmt.Errorf("vcpu %d: %w", c.id, err)
	}
	// KVM's statistics count every exit, also the ones it handles itself;
	// a kernel without them (before 5.14) leaves the metric out.
	if st, err := fd.Stats(); err == nil && st.Has("exits") {
		c.stats.Store(st)
	} else if err == nil {
		st.Close()
	}
	if err := c.configure(); err != nil {
		return fmt.Errorf("vcpu %d: %w", c.id, err)
	}
	if c.m.ring.entries > 0 && c.m.ring.vcpuTicks() {
		if c.ringTick, err = startCPUTimer(ringTickEvery); err != nil {
			return fmt.Errorf("vcpu %d: dirty ring tick: %w", c.id, err)
		}
	}
	return nil
}

// run is the KVM_RUN loop.
func (c *vcpu) run() error {
	for {
		c.resetsAtRun = c.m.ring.resets.Load()
		ex, err := c.fd.Run()
		if errors.Is(err, kvmapi.ErrInterrupted) {
			// Clear immediate_exit before draining: a request sent after
			// the drain comes with a kick that sets it again.
			c.fd.SetImmediateExit(false)
			if stop := c.serve(); stop {
				return nil
			}
			if c.ringTick != nil {
				c.m.reapRingsIfFilling()
			}
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			// An AP woken from wait-for-SIPI: KVM asks us to run again.
			continue
		}
		if err != nil {
			return fmt.Errorf("vcpu %d: run: %w", c.id, err)
		}
		c.exits[ex.Reason%kvmapi.NumExitReasons].Add(1)
		if err := c.handle(ex); err != nil {
			if errors.Is(err, errStop) {
				return nil
			}
			return c.fatal(ex, err)
		}
	}
}

var errStop = errors.New("stop")

// serve handles queued requests. It reports true when the machine stops.
func (c *vcpu) serve() bool {
	for {
		select {
		case <-c.m.done:
			return true
		case r := <-c.reqs:
			if r.kind == reqPause {
				if stop := c.paused(r); stop {
					return true
				}
				continue
			}
			r.reply <- nil // resume or do while running: nothing to do
		default:
			return false
		}
	}
}

// paused completes pending I/O, reports paused, then serves requests until
// resumed.
func (c *vcpu) paused(r vcpuReq) bool {
	// With immediate_exit set, KVM_RUN finishes the pending PIO/MMIO and
	// returns EINTR without entering the guest: now the register state is
	// consistent.
	c.fd.SetImmediateExit(true)
	for {
		c.resetsAtRun = c.m.ring.resets.Load()
		ex, err := c.fd.Run()
		if errors.Is(err, kvmapi.ErrInterrupted) {
			break
		}
		if errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			r.reply <- fmt.Errorf("vcpu %d: pause: %w", c.id, err)
			return false
		}
		if err := c.handle(ex); err != nil { // cannot happen with immediate_exit, but be safe
			r.reply <- err
			return false
		}
	}
	if c.coal != nil && c.coal.Pending() {
		// Out of KVM_RUN for the pause: what the guest queued is applied
		// before anyone saves the devices (coalesced.go).
		c.m.drainCoalesced(c.coal)
	}
	r.reply <- nil
	for {
		r, ok := pollRecv(c.reqs, c.m.done, c.m.spin)
		if !ok {
			return true
		}
		switch r.kind {
		case reqResume:
			c.fd.SetImmediateExit(false)
			c.m.noteResumed(time.Now())
			r.reply <- nil
			return false
		case reqDo:
			r.reply <- r.fn(c.id, c.fd)
		case reqPause:
			r.reply <- nil
		}
	}
}

// handle dispatches one exit. It makes no KVM calls, except that a full
// dirty ring is reaped (dirty.go) so that the vCPU can go on.
func (c *vcpu) handle(ex kvmapi.Exit) error {
	if ex.Reason == kvmapi.ExitDirtyRingFull {
		return c.m.dirtyRingFull(c.resetsAtRun)
	}
	if c.coal != nil && (ex.Reason == kvmapi.ExitIO || ex.Reason == kvmapi.ExitMMIO) && c.coal.Pending() {
		// A latch write queued before this access (coalesced.go).
		c.m.drainCoalesced(c.coal)
	}
	return handleExit(ex, c.m.pio, c.m.mmio, c.m.finish)
}

// handleExit is pure dispatch: buses for I/O, finish for the exits that
// end the machine, an error for the ones it cannot continue from.
func handleExit(ex kvmapi.Exit, pio, mmio *Bus, finish func(Result, error)) error {
	switch ex.Reason {
	case kvmapi.ExitIO:
		io := ex.IO
		for i := 0; i < io.Count; i++ {
			d := io.Data[i*io.Size : (i+1)*io.Size]
			if io.In {
				pio.Read(uint64(io.Port), d)
			} else {
				pio.Write(uint64(io.Port), d)
			}
		}
		return nil
	case kvmapi.ExitMMIO:
		if ex.MMIO.Write {
			mmio.Write(ex.MMIO.Addr, ex.MMIO.Data)
		} else {
			mmio.Read(ex.MMIO.Addr, ex.MMIO.Data)
		}
		return nil
	case kvmapi.ExitHLT:
		return nil // the in-kernel LAPIC normally keeps HLT inside KVM
	case kvmapi.ExitSystemEvent:
		switch ex.Event.Type {
		case kvmapi.SystemEventShutdown:
			finish(Result{Status: 0, Reason: "poweroff"}, nil)
			return errStop
		case kvmapi.SystemEventReset:
			finish(Result{Status: 0, Reason: "reset"}, nil)
			return errStop
		}
		return &kvmapi.ExitError{Reason: ex.Reason, Detail: ex.String()}
	case kvmapi.ExitShutdown:
		return &kvmapi.ExitError{Reason: ex.Reason, Detail: "guest triple fault"}
	}
	return &kvmapi.ExitError{Reason: ex.Reason, Detail: ex.String()}
}

// VCPUError is a fatal exit with the registers at the time.
type VCPUError struct {
	ID    int
	Err   error
	Regs  kvmapi.Regs
	Sregs kvmapi.Sregs
}

func (e *VCPUError) Error() string {
	r, s := e.Regs, e.Sregs
	return fmt.Sprintf("vcpu %d: %v\n"+
		"  rip=%#016x rsp=%#016x rflags=%#x\n"+
		"  rax=%#x rbx=%#x rcx=%#x rdx=%#x rsi=%#x rdi=%#x rbp=%#x\n"+
		"  r8=%#x r9=%#x r10=%#x r11=%#x r12=%#x r13=%#x r14=%#x r15=%#x\n"+
		"  cs=%#x ss=%#x cr0=%#x cr2=%#x cr3=%#x cr4=%#x efer=%#x",
		e.ID, e.Err, r.RIP, r.RSP, r.RFLAGS,
		r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI, r.RBP,
		r.R8, r.R9, r.R10, r.R11, r.R12, r.R13, r.R14, r.R15,
		s.CS.Selector, s.SS.Selector, s.CR0, s.CR2, s.CR3, s.CR4, s.EFER)
}

func (e *VCPUError) Unwrap() error { return e.Err }

func (c *vcpu) fatal(ex kvmapi.Exit, err error) error {
	ve := &VCPUError{ID: c.id, Err: err}
	ve.Regs, _ = c.fd.Regs() // best effort: the exit is the story
	ve.Sregs, _ = c.fd.Sregs()
	return ve
}
