package vmm

// Pause and resume: every consistent cut (a snapshot, a checkpoint, a
// migration's handover) stops the vCPUs through Pause and the devices
// through QuiesceDevices, inside WithPaused.

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"govmm/kvmapi"
)

// ErrStopped is returned by Pause and Resume on a machine that has stopped.
var ErrStopped = errors.New("machine stopped")

// stoppedErr is ErrStopped with why the machine stopped (a fatal vCPU
// exit's error, or its result's reason), once m.done is closed.
func (m *Machine) stoppedErr() error {
	if m.err != nil {
		return fmt.Errorf("%w: %w", ErrStopped, m.err)
	}
	return fmt.Errorf("%w (%s)", ErrStopped, m.result.Reason)
}

// Pause stops every vCPU at a consistent point: each has left KVM_RUN
// with its pending PIO/MMIO completed. It returns when all are paused.
// Pauses nest: the machine runs again after as many Resumes.
func (m *Machine) Pause() error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if m.paused == 0 {
		if err := m.broadcast(reqPause, nil); err != nil {
			return err
		}
	}
	m.paused++
	return nil
}

// Resume undoes one Pause; the vCPUs run again when no pause is held.
// After HandOver it refuses with ErrHandedOver.
func (m *Machine) Resume() error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if m.handedOver {
		return ErrHandedOver
	}
	if m.paused == 0 {
		return nil
	}
	if m.paused == 1 {
		if m.devicesHeld {
			m.devicesHeld = false
			if err := m.resumeDevices(); err != nil {
				return err
			}
		}
		// Every vCPU waits paused for its requests (vcpu.paused): no
		// kick. One would set immediate_exit and signal a thread that
		// may already be back in KVM_RUN by then (a polling vCPU takes
		// the request at once), costing it a spurious exit.
		if err := m.broadcastWhile(reqResume, nil, nil, false); err != nil {
			return err
		}
	}
	m.paused--
	return nil
}

// ResumedAt is when the last vCPU left the latest pause for KVM_RUN: when
// the guest ran again. It can be earlier than Resume's return, by as long
// as the goroutine that called Resume waits to be scheduled again after
// the vCPUs' answers (on a host whose every P is busy, up to the Go
// scheduler's time slice, while the guest already runs). Zero before the
// first resume.
func (m *Machine) ResumedAt() time.Time {
	if ns := m.resumed.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// noteResumed records t as a vCPU's resume, if it is the latest.
func (m *Machine) noteResumed(t time.Time) {
	ns := t.UnixNano()
	for {
		old := m.resumed.Load()
		if old >= ns || m.resumed.CompareAndSwap(old, ns) {
			return
		}
	}
}

// ErrHandedOver is returned by Resume and ResumeDevices on a machine that
// handed its guest over to another host (HandOver).
var ErrHandedOver = errors.New("machine handed its guest over (migrated away): it never runs again")

// HandOver records that the guest now lives on elsewhere (a migration's
// destination acknowledged the final checkpoint): from here on this
// machine's vCPUs never run and its devices stay quiesced, so it sends no
// frame, executes no disk write and writes no guest memory again, even
// while the destination already runs the guest. Only Stop and Close
// remain. Call it from inside WithPaused, at the cut; the machine must be
// paused (ErrNotPaused otherwise).
func (m *Machine) HandOver() error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if m.paused == 0 {
		return ErrNotPaused
	}
	m.handedOver = true
	return nil
}

// HandedOver reports whether HandOver was called.
func (m *Machine) HandedOver() bool {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	return m.handedOver
}

// WithPaused runs fn at a consistent cut: every vCPU paused and every
// device quiesced. Such operations (a checkpoint, a snapshot) never
// interleave. Afterwards the devices and vCPUs go on, unless fn stopped
// the machine, handed it over, or another pause is held.
func (m *Machine) WithPaused(ctx context.Context, fn func() error) error {
	m.stwMu.Lock()
	defer m.stwMu.Unlock()
	if err := m.Pause(); err != nil {
		return err
	}
	defer m.Resume()
	if err := m.QuiesceDevices(ctx); err != nil {
		return err
	}
	defer m.ResumeDevices()
	return fn()
}

// OnVCPUs runs fn on every vCPU's own thread while the machine is paused
// (to save or restore its state) and returns the first error.
func (m *Machine) OnVCPUs(fn func(id int, fd *kvmapi.VCPU) error) error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if m.paused == 0 {
		return ErrNotPaused
	}
	return m.broadcastWhile(reqDo, fn, nil, false)
}

// SetPauseHelper sets fn (nil: none) to run on a pausing goroutine
// between its looks for the vCPUs' answers to the pause's kick, while it
// polls (Machine.spin). A vCPU may be unable to answer until work of the
// VMM's is done: one that wrote a write-protected page inside the kick's
// window waits in the kernel for the copy-on-write fault handler, and
// the kick does not end that wait (guestmem.Protector.ResolvePending,
// which replicate sets here, resolves it from the poll rather than after
// the handler's wake-up). fn must not block, and must be safe to call
// concurrently with anything else the machine runs; it is never called
// concurrently with itself (pauses are serialised by pauseMu).
func (m *Machine) SetPauseHelper(fn func()) {
	if fn == nil {
		m.pauseHelper.Store(nil)
		return
	}
	m.pauseHelper.Store(&fn)
}

// ErrNotPaused is returned for operations that need a paused machine.
var ErrNotPaused = errors.New("machine not paused")

// onVCPUsWhile is OnVCPUs that runs meanwhile on the calling goroutine
// while the vCPU threads run fn; meanwhile's error joins theirs.
func (m *Machine) onVCPUsWhile(fn func(id int, fd *kvmapi.VCPU) error, meanwhile func() error) error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if m.paused == 0 {
		return ErrNotPaused
	}
	return m.broadcastWhile(reqDo, fn, meanwhile, false)
}

func (m *Machine) broadcast(kind reqKind, fn func(int, *kvmapi.VCPU) error) error {
	return m.broadcastWhile(kind, fn, nil, true)
}

// broadcastWhile sends a request to every vCPU, runs meanwhile (if not
// nil) and waits for their replies. kick interrupts KVM_RUN; a request to
// a paused machine needs none (every vCPU waits on its request channel,
// or has a pause queued ahead of the request with immediate_exit set:
// releasePaused), and leaving the signal out halves the round trip
// (BenchmarkSaveStateParts: ~9 µs instead of ~17).
func (m *Machine) broadcastWhile(kind reqKind, fn func(int, *kvmapi.VCPU) error, meanwhile func() error, kick bool) error {
	replies := make([]chan error, len(m.vcpus))
	for i, c := range m.vcpus {
		replies[i] = make(chan error, 1)
		select {
		case c.reqs <- vcpuReq{kind: kind, fn: fn, reply: replies[i]}:
		case <-m.done:
			return m.stoppedErr()
		}
		if kick {
			c.kick()
		}
	}
	var errs []error
	if meanwhile != nil {
		errs = append(errs, meanwhile())
	}
	var helper func()
	if kick {
		if h := m.pauseHelper.Load(); h != nil {
			helper = *h
		}
	}
	for _, r := range replies {
		err, ok := pollRecvHelping(r, m.done, m.spin, helper)
		if !ok {
			return m.stoppedErr()
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// releasePaused lets the vCPUs go with a pause request already queued and
// immediate_exit set: each one's first KVM_RUN returns at once, without
// entering the guest, and the vCPU waits paused. The devices stay
// quiesced (restore leaves them so) until Resume lets the vCPUs run.
func (m *Machine) releasePaused(release chan struct{}) error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	replies := make([]chan error, len(m.vcpus))
	for i, c := range m.vcpus {
		replies[i] = make(chan error, 1)
		c.fd.SetImmediateExit(true)
		c.reqs <- vcpuReq{kind: reqPause, reply: replies[i]} // buffered; nothing else is queued yet
	}
	close(release)
	for _, r := range replies {
		select {
		case err := <-r:
			if err != nil {
				return err
			}
		case <-m.done:
			return m.stoppedErr()
		}
	}
	m.paused = 1
	m.devicesHeld = true
	return nil
}

// pollRecv receives from ch; ok is false once done is closed. With spin
// above zero it polls for up to that long before it blocks: a cut is
// three round trips between its goroutine and the vCPU threads (pause,
// save, resume), each answered within microseconds, and a thread that
// sleeps between them must be woken each time, the wake-up of an idle
// CPU (Machine.spin, pauseSpin). A paused vCPU waits for its requests so
// and a cut for the vCPUs' answers.
//
// After pollAlone it yields the CPU (sched_yield) between looks. A
// thread the answer depends on may have been woken on this very CPU
// (a vCPU leaving KVM_RUN, the copy-on-write fault handler a vCPU waits
// on, the other side of the cut), and a poller that keeps its CPU makes
// it wait for the poller's time slice: on this project's host that made
// one checkpoint in ten of a copy-on-write guest stop for ~2.2 ms, the
// whole poll, instead of ~0.2 (bench/results/20261206T193000Z). Alone
// on its CPU, a yielding poller only pays the system call between looks.
func pollRecv[T any](ch <-chan T, done <-chan struct{}, spin time.Duration) (v T, ok bool) {
	return pollRecvHelping(ch, done, spin, nil)
}

// pollRecvHelping is pollRecv that, while it polls, calls help (if not
// nil) between looks: SetPauseHelper.
func pollRecvHelping[T any](ch <-chan T, done <-chan struct{}, spin time.Duration, help func()) (v T, ok bool) {
	if spin > 0 {
		start := time.Now()
		for {
			select {
			case v = <-ch:
				return v, true
			case <-done:
				return v, false
			default:
			}
			if help != nil {
				help()
			}
			waited := time.Since(start)
			if waited > spin {
				break
			}
			if waited > pollAlone {
				unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			}
		}
	}
	select {
	case v = <-ch:
		return v, true
	case <-done:
		return v, false
	}
}

// pollAlone is how long pollRecv polls without yielding its CPU: about
// the longest a cut's round trip takes when every thread in it has a CPU
// (the state save's ioctls, ~50 µs on this host), so that the common
// answer costs no system call.
const pollAlone = 50 * time.Microsecond
