package vmm

// The machine's life after New: start (fresh or from a saved state), run
// until something stops it, wait, and close.

import (
	"errors"
	"time"
)

// Start loads the guest and starts every vCPU. It returns once all vCPUs
// are set up (or the first setup error).
func (m *Machine) Start() error {
	if err := m.load(); err != nil {
		return err
	}
	m.loaded.Store(time.Now().UnixNano())
	return m.start(nil, false)
}

// StartFrom resumes a saved machine: guest memory must already hold the
// pages of the same instant. It checks that st fits this machine before
// touching anything; then each vCPU restores its state on its own thread
// (CPUID first), then the interrupt controllers, PIT, clock and devices.
// Devices are resumed and the vCPUs run.
func (m *Machine) StartFrom(st *MachineState) error {
	if err := m.checkState(st); err != nil {
		return err
	}
	return m.start(st, false)
}

// StartFromPaused is StartFrom for a machine that does not run yet: it
// comes up exactly at the saved cut, every vCPU paused before its first
// guest instruction (one pause held, which Resume releases) and every
// device quiesced until then, so that nothing changes guest memory or
// device state meanwhile. A snapshot taken now equals the one restored,
// except for the clocks, which run on in KVM.
func (m *Machine) StartFromPaused(st *MachineState) error {
	if err := m.checkState(st); err != nil {
		return err
	}
	return m.start(st, true)
}

// start sets up every vCPU, restores st (when not nil) and lets the vCPUs
// go; paused makes each of them pause before entering the guest.
func (m *Machine) start(st *MachineState, paused bool) error {
	m.restoring = st
	setup := make(chan error, m.cfg.CPUs)
	for id := 0; id < m.cfg.CPUs; id++ {
		c := newVCPU(m, id)
		m.vcpus = append(m.vcpus, c)
	}
	release := make(chan struct{})
	for _, c := range m.vcpus {
		m.wg.Add(1)
		go c.loop(setup, release)
	}
	var firstErr error
	for range m.vcpus {
		if err := <-setup; err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if firstErr == nil && st != nil {
		if err := m.restoreMachineLevel(st); err != nil {
			firstErr = err
		} else if !paused {
			firstErr = m.ResumeDevices()
		}
	}
	if firstErr != nil {
		m.finish(Result{Reason: "setup failed"}, firstErr)
		close(release)
		m.wg.Wait()
		return firstErr
	}
	if !paused {
		m.released.Store(time.Now().UnixNano())
		close(release)
		return nil
	}
	return m.releasePaused(release)
}

// Loaded is when Start had loaded the kernel, initramfs and boot
// structures into guest memory, before it set up the vCPUs (the zero time
// before that, and for a machine started from a saved state).
func (m *Machine) Loaded() time.Time {
	if ns := m.loaded.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Released is when Start let the vCPUs go into their first KVM_RUN (the
// zero time before that, and for a machine started paused).
func (m *Machine) Released() time.Time {
	if ns := m.released.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Wait blocks until the machine stops and says why. The error is non-nil
// for a fatal vCPU exit or a setup failure.
func (m *Machine) Wait() (Result, error) {
	<-m.done
	m.wg.Wait()
	m.uart.Flush()
	return m.result, m.err
}

// Done is closed when the machine stops.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Stop stops the machine from outside (e.g. a signal or the escape key).
func (m *Machine) Stop() { m.finish(Result{Status: 0, Reason: "stopped"}, nil) }

// StopWith stops the machine with a given result (e.g. after migrating
// away, when the guest lives on elsewhere).
func (m *Machine) StopWith(r Result) { m.finish(r, nil) }

// finish records the first reason to stop and makes every vCPU leave.
func (m *Machine) finish(r Result, err error) {
	m.doneOnce.Do(func() {
		m.result, m.err = r, err
		close(m.done)
		for _, c := range m.vcpus {
			c.kick()
		}
	})
}

// Close releases KVM and guest memory. Call after Wait.
func (m *Machine) Close() error {
	m.finish(Result{Reason: "closed"}, nil)
	m.wg.Wait()
	if n := m.procs.Swap(0); n > 0 {
		releaseProcs(int(n))
	}
	m.closeDirtyRings()
	var errs []error
	for _, c := range m.vcpus {
		if st := c.stats.Swap(nil); st != nil {
			errs = append(errs, st.Close())
		}
		if c.fd != nil {
			errs = append(errs, c.fd.Close())
		}
	}
	if m.vm != nil {
		errs = append(errs, m.vm.Close())
	}
	if m.mem != nil {
		errs = append(errs, m.mem.Close())
	}
	if m.sys != nil {
		errs = append(errs, m.sys.Close())
	}
	return errors.Join(errs...)
}
