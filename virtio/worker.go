package virtio

// The worker side of the transport: admission (begin/end), the worker
// goroutine that services queue kicks, interrupts (MSI-X or INTx), and
// breaking a device on a malformed ring.

import (
	"errors"

	"golang.org/x/sys/unix"

	"govmm/vmm/pci"
)

// failLocked marks the device broken after a malformed ring: it stops
// processing, sets DEVICE_NEEDS_RESET and raises a configuration change
// interrupt (§2.1.2). Only a reset revives it.
func (t *transport) failLocked(err error) {
	if t.broken {
		return
	}
	t.broken = true
	t.status |= StatusDeviceNeedsReset
	t.log.Warn("malformed virtqueue; device needs reset", "err", err)
	t.configInterruptLocked()
}

func (t *transport) fail(err error) {
	t.mu.Lock()
	t.failLocked(err)
	t.mu.Unlock()
}

// configInterruptLocked signals a configuration change (§4.1.5.3).
func (t *transport) configInterruptLocked() {
	t.isr |= isrConfig
	if t.msix.Enabled() {
		if _, err := t.msix.Notify(t.configVector); err != nil {
			t.log.Warn("send config msi", "err", err)
		}
		return
	}
	t.updateINTxLocked()
}

// queueInterruptLocked signals used buffers on queue i (§4.1.5.2).
func (t *transport) queueInterruptLocked(i int) {
	if t.msix.Enabled() {
		// With MSI-X, NO_VECTOR means the driver wants no interrupt.
		if _, err := t.msix.Notify(t.queues[i].vector); err != nil {
			t.log.Warn("send queue msi", "queue", i, "err", err)
		}
		return
	}
	t.isr |= isrQueue
	t.updateINTxLocked()
}

// updateINTxLocked drives the INTx line to match the ISR: asserted while
// any ISR bit is set, MSI-X is off and the command register allows INTx.
func (t *transport) updateINTxLocked() {
	want := t.isr != 0 && !t.msix.Enabled() && t.cfg.Uint16(pci.RegCommand)&pci.CommandIntxDisable == 0
	if want == t.intxAsserted {
		return
	}
	var gsi [1]byte
	t.cfg.Read(pci.RegInterruptLn, gsi[:])
	if err := t.host.SetIRQLine(uint32(gsi[0]), want); err != nil {
		t.log.Warn("set intx line", "gsi", gsi[0], "level", want, "err", err)
		return
	}
	t.intxAsserted = want
}

// begin admits the calling goroutine to device processing: false when the
// driver is not running, the device is broken, quiesced or closed.
func (t *transport) begin() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.runnableLocked() {
		return false
	}
	t.busy++
	return true
}

func (t *transport) runnableLocked() bool {
	return t.status&StatusDriverOK != 0 && !t.broken && !t.paused && !t.closed
}

func (t *transport) end() {
	t.mu.Lock()
	t.busy--
	if t.busy == 0 {
		t.cond.Broadcast()
	}
	t.mu.Unlock()
}

// run is the worker: it waits for queue kicks and services the queues.
func (t *transport) run() {
	defer t.wg.Done()
	fds := make([]unix.PollFd, len(t.queues)+1)
	for i, fd := range t.efds {
		fds[i] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	}
	fds[len(t.queues)] = unix.PollFd{Fd: int32(t.stopFD), Events: unix.POLLIN}
	var buf [8]byte
	for {
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			t.log.Error("virtio worker stopped", "err", err)
			return
		}
		if fds[len(t.queues)].Revents != 0 {
			return
		}
		for i := range t.queues {
			if fds[i].Revents == 0 {
				continue
			}
			_, _ = unix.Read(int(fds[i].Fd), buf[:]) // clear the counter
			t.service(i)
		}
	}
}

// service processes queue i until it is empty, the device stops, or the
// machine quiesces it; requests are never split.
func (t *transport) service(i int) {
	if !t.begin() {
		return
	}
	defer t.end()
	t.mu.Lock()
	enabled := t.queues[i].enabled
	t.mu.Unlock()
	if !enabled {
		return
	}
	for {
		did, err := t.dev.process(i)
		if err != nil {
			t.fail(err)
			return
		}
		t.mu.Lock()
		if t.queues[i].ring.takeInterrupt() {
			t.queueInterruptLocked(i)
		}
		run := t.runnableLocked()
		t.mu.Unlock()
		if !did || !run {
			return
		}
	}
}

// kick asks the worker to look at queue i.
func (t *transport) kick(i int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.closed {
		signal(t.efds[i])
	}
}

// ring returns queue i's ring for the worker (nil if not enabled).
func (t *transport) ring(i int) *Queue { return t.queues[i].ring }

// accepted returns the negotiated features.
func (t *transport) accepted() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.drvFeatures
}
