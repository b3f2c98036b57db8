package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"govmm/kvmapi"
	"govmm/vmm/devstate"
)

// MachineState is the only description of a machine at one instant.
// Snapshot files, migration and every replication epoch use it unchanged;
// guest pages travel beside it. docs/FORMATS.md documents the encoding.
type MachineState struct {
	VCPUs   []VCPUState
	IRQChip IRQChipState
	Clock   kvmapi.ClockData
	Devices []devstate.State // sorted by ID
	Memory  MemoryLayout
	// TSCKHz is the guest's TSC frequency (KVM_GET_TSC_KHZ), which its
	// clocks were calibrated against; restore asks KVM for the same
	// rate. 0 (a version 1 state) means unknown: the host's rate.
	TSCKHz uint32
}

// VCPUState is everything KVM holds for one vCPU.
type VCPUState struct {
	MPState   kvmapi.MPState
	Regs      kvmapi.Regs
	Sregs     kvmapi.Sregs
	XCRs      kvmapi.XCRs
	Xsave     []byte
	LAPIC     kvmapi.LAPICState
	MSRs      []kvmapi.MSREntry
	DebugRegs kvmapi.DebugRegs
	Events    kvmapi.VCPUEvents
	// CPUID is what the guest saw on this vCPU (KVM_SET_CPUID2 at boot):
	// restore sets it again, on a host that offers every feature in it.
	// Empty (a version 1 state) means this host's own.
	CPUID []kvmapi.CPUIDEntry
}

// IRQChipState is both PICs, the IOAPIC and the PIT.
type IRQChipState struct {
	PICMaster, PICSlave, IOAPIC kvmapi.IRQChip
	PIT                         kvmapi.PITState2
}

// MemoryLayout names the machine the state belongs to; restore refuses a
// machine of another shape.
type MemoryLayout struct {
	MemSize uint64
	CPUs    int
}

// ErrStateMismatch is returned when a state does not fit the machine.
var ErrStateMismatch = errors.New("machine state does not match this machine")

// SaveState captures the machine at a consistent cut. The machine must be
// paused and its devices quiesced (QuiesceDevices).
//
// Order, per vCPU on its own thread: MP_STATE first (it may complete
// pending events, which changes the registers), then XCRS, XSAVE, LAPIC,
// MSRS, DEBUGREGS, REGS, SREGS and VCPU_EVENTS last (the last three in one
// KVM_RUN where KVM offers the sync registers). Meanwhile, on the calling
// goroutine: the PICs, IOAPIC, PIT, the KVM clock and every device. No
// order of these reads is one instant (the in-kernel PIT and the LAPIC
// timers run on while the vCPUs are paused); reading the chips beside the
// vCPUs rather than after them leaves the same window an interrupt may
// fall in, and takes the chips' ~5 µs out of the pause.
func (m *Machine) SaveState() (*MachineState, error) {
	st := &MachineState{}
	if err := m.saveState(st, nil, nil); err != nil {
		return nil, err
	}
	return st, nil
}

// saveState fills st, reusing its slices (and xsave's buffers, one per
// vCPU, if not nil) where they are large enough: EncodeState's every-epoch
// save allocates next to nothing. The vCPUs are read on their threads;
// meanwhile (if not nil), then the machine level, on this goroutine.
func (m *Machine) saveState(st *MachineState, xsave [][]uint64, meanwhile func() error) error {
	if len(st.VCPUs) != len(m.vcpus) {
		st.VCPUs = make([]VCPUState, len(m.vcpus))
	}
	st.Memory = MemoryLayout{MemSize: m.cfg.MemSize, CPUs: m.cfg.CPUs}
	return m.onVCPUsWhile(func(id int, fd *kvmapi.VCPU) error {
		v := &st.VCPUs[id]
		var buf []uint64
		if xsave != nil {
			buf = xsave[id]
		}
		if err := m.saveVCPU(fd, v, buf); err != nil {
			return fmt.Errorf("vcpu %d: %w", id, err)
		}
		v.CPUID = append(v.CPUID[:0], m.vcpus[id].cpuid...)
		if id == 0 {
			khz, err := m.vcpuTSCKHz(fd)
			if err != nil {
				return fmt.Errorf("vcpu %d: get tsc khz: %w", id, err)
			}
			st.TSCKHz = khz
		}
		return nil
	}, func() error {
		if meanwhile != nil {
			if err := meanwhile(); err != nil {
				return err
			}
		}
		return m.saveMachineLevel(st)
	})
}

// saveMachineLevel fills in the PICs, the IOAPIC, the PIT, the KVM clock
// and the devices (sorted by ID).
func (m *Machine) saveMachineLevel(st *MachineState) error {
	var err error
	if st.IRQChip, err = m.saveIRQChip(); err != nil {
		return err
	}
	if st.Clock, err = m.vm.Clock(); err != nil {
		return fmt.Errorf("get clock: %w", err)
	}
	st.Devices = st.Devices[:0]
	for _, d := range m.stateful {
		s, err := d.SaveState()
		if err != nil {
			return err
		}
		st.Devices = append(st.Devices, s)
	}
	slices.SortFunc(st.Devices, func(a, b devstate.State) int { return strings.Compare(a.ID, b.ID) })
	return nil
}

// vcpuTSCKHz is the guest's TSC rate. Only KVM_SET_TSC_KHZ changes it,
// which govmm issues only while restoring a vCPU (restoreVCPU, which
// forgets the cached rate first): read once, it holds until then.
func (m *Machine) vcpuTSCKHz(fd *kvmapi.VCPU) (uint32, error) {
	if khz := m.guestTSCKHz.Load(); khz != 0 {
		return khz, nil
	}
	khz, err := fd.TSCKHz()
	if err != nil {
		return 0, err
	}
	m.guestTSCKHz.Store(khz)
	return khz, nil
}

// saveVCPU reads one vCPU into v, reusing v.MSRs and, if it is large
// enough, xsave for the XSAVE area (v.Xsave aliases it then). REGS, SREGS
// and VCPU_EVENTS come last, in one KVM_RUN where KVM offers the sync
// registers: nothing but MP_STATE (read first) changes the registers of a
// paused vCPU, and the events stay last.
func (m *Machine) saveVCPU(fd *kvmapi.VCPU, v *VCPUState, xsave []uint64) error {
	var err error
	if v.MPState, err = fd.MPState(); err != nil {
		return fmt.Errorf("get mp_state: %w", err)
	}
	if v.XCRs, err = fd.XCRs(); err != nil {
		return fmt.Errorf("get xcrs: %w", err)
	}
	x, err := fd.XsaveInto(xsave, m.xsave)
	if err != nil {
		return fmt.Errorf("get xsave: %w", err)
	}
	v.Xsave = x.Region
	if v.LAPIC, err = fd.LAPIC(); err != nil {
		return fmt.Errorf("get lapic: %w", err)
	}
	v.MSRs = v.MSRs[:0]
	for _, idx := range m.msrs {
		v.MSRs = append(v.MSRs, kvmapi.MSREntry{Index: idx})
	}
	if err := fd.MSRs(v.MSRs); err != nil {
		return fmt.Errorf("get msrs: %w", err)
	}
	if v.DebugRegs, err = fd.DebugRegs(); err != nil {
		return fmt.Errorf("get debugregs: %w", err)
	}
	if m.syncRegs {
		if v.Regs, v.Sregs, v.Events, err = fd.SyncedState(); err != nil {
			return fmt.Errorf("get sync regs: %w", err)
		}
		return nil
	}
	if v.Regs, err = fd.Regs(); err != nil {
		return fmt.Errorf("get regs: %w", err)
	}
	if v.Sregs, err = fd.Sregs(); err != nil {
		return fmt.Errorf("get sregs: %w", err)
	}
	if v.Events, err = fd.VCPUEvents(); err != nil {
		return fmt.Errorf("get vcpu events: %w", err)
	}
	return nil
}

func (m *Machine) saveIRQChip() (IRQChipState, error) {
	var s IRQChipState
	var err error
	if s.PICMaster, err = m.vm.IRQChip(kvmapi.IRQChipPICMaster); err != nil {
		return s, fmt.Errorf("get pic master: %w", err)
	}
	if s.PICSlave, err = m.vm.IRQChip(kvmapi.IRQChipPICSlave); err != nil {
		return s, fmt.Errorf("get pic slave: %w", err)
	}
	if s.IOAPIC, err = m.vm.IRQChip(kvmapi.IRQChipIOAPIC); err != nil {
		return s, fmt.Errorf("get ioapic: %w", err)
	}
	if s.PIT, err = m.vm.PIT2(); err != nil {
		return s, fmt.Errorf("get pit: %w", err)
	}
	return s, nil
}

// restoreVCPU puts a saved vCPU back, after CPUID is set. Order: the TSC
// rate (before the TSC itself is written), SREGS (it carries the APIC
// base), LAPIC, MSRS (the TSC deadline needs the LAPIC), XCRS, XSAVE,
// REGS, MP_STATE, DEBUGREGS, and VCPU_EVENTS last.
func restoreVCPU(fd *kvmapi.VCPU, v *VCPUState, tscKHz uint32, xsaveSize int) error {
	if tscKHz != 0 {
		// The cached rate (vcpuTSCKHz) is forgotten by the caller.
		cur, err := fd.TSCKHz()
		if err != nil {
			return fmt.Errorf("get tsc khz: %w", err)
		}
		if cur != tscKHz {
			if err := fd.SetTSCKHz(tscKHz); err != nil {
				return fmt.Errorf("set tsc khz %d (this host: %d): %w", tscKHz, cur, err)
			}
		}
	}
	if err := fd.SetSregs(v.Sregs); err != nil {
		return fmt.Errorf("set sregs: %w", err)
	}
	if err := fd.SetLAPIC(v.LAPIC); err != nil {
		return fmt.Errorf("set lapic: %w", err)
	}
	if err := fd.SetMSRs(v.MSRs); err != nil {
		return fmt.Errorf("set msrs: %w", err)
	}
	if err := fd.SetXCRs(v.XCRs); err != nil {
		return fmt.Errorf("set xcrs: %w", err)
	}
	if err := fd.SetXsave(kvmapi.Xsave{Region: v.Xsave}, xsaveSize); err != nil {
		return fmt.Errorf("set xsave: %w", err)
	}
	if err := fd.SetRegs(v.Regs); err != nil {
		return fmt.Errorf("set regs: %w", err)
	}
	if err := fd.SetMPState(v.MPState); err != nil {
		return fmt.Errorf("set mp_state: %w", err)
	}
	if err := fd.SetDebugRegs(v.DebugRegs); err != nil {
		return fmt.Errorf("set debugregs: %w", err)
	}
	if err := fd.SetVCPUEvents(v.Events); err != nil {
		return fmt.Errorf("set vcpu events: %w", err)
	}
	return nil
}

// CheckState refuses, with ErrStateMismatch, a state that this machine
// could not resume: another shape, other devices, an XSAVE area larger
// than KVM here takes, CPU features the guest uses that this host lacks,
// or a TSC rate it cannot give. StartFrom checks the same; a migration
// destination or standby calls it before acknowledging a checkpoint, so
// that the source keeps a guest that could not run here.
func (m *Machine) CheckState(st *MachineState) error { return m.checkState(st) }

// checkState refuses a state that does not fit this machine, before
// anything is changed.
func (m *Machine) checkState(st *MachineState) error {
	if st.Memory.MemSize != m.cfg.MemSize {
		return fmt.Errorf("%w: memory %d MiB, this machine has %d MiB", ErrStateMismatch, st.Memory.MemSize>>20, m.cfg.MemSize>>20)
	}
	if st.Memory.CPUs != m.cfg.CPUs || len(st.VCPUs) != m.cfg.CPUs {
		return fmt.Errorf("%w: %d vcpus, this machine has %d", ErrStateMismatch, len(st.VCPUs), m.cfg.CPUs)
	}
	for i := range st.VCPUs {
		if len(st.VCPUs[i].Xsave) > m.xsave {
			return fmt.Errorf("%w: vcpu %d xsave area %d bytes, kvm here takes %d", ErrStateMismatch, i, len(st.VCPUs[i].Xsave), m.xsave)
		}
		if saved := st.VCPUs[i].CPUID; len(saved) > 0 {
			if err := checkCPUID(saved, m.shaped[i]); err != nil {
				return fmt.Errorf("%w: vcpu %d: %w", ErrStateMismatch, i, err)
			}
		}
	}
	if err := checkTSC(st.TSCKHz, m.tscKHz, m.tscControl); err != nil {
		return fmt.Errorf("%w: %w", ErrStateMismatch, err)
	}
	have := map[string]string{}
	for _, d := range m.stateful {
		have[d.id] = d.kind
	}
	if len(st.Devices) != len(have) {
		return fmt.Errorf("%w: %d devices in the state, %d here (%s)", ErrStateMismatch, len(st.Devices), len(have), m.deviceList())
	}
	for _, d := range st.Devices {
		kind, ok := have[d.ID]
		if !ok || kind != d.Kind {
			return fmt.Errorf("%w: device %s (%s) has no counterpart here (%s)", ErrStateMismatch, d.ID, d.Kind, m.deviceList())
		}
	}
	return nil
}

func (m *Machine) deviceList() string {
	var b bytes.Buffer
	for i, d := range m.stateful {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%s %s", d.kind, d.id)
	}
	if b.Len() == 0 {
		return "none"
	}
	return b.String()
}

// restoreMachineLevel puts back the interrupt controllers, the PIT, the
// KVM clock and the devices, after every vCPU is restored.
func (m *Machine) restoreMachineLevel(st *MachineState) error {
	for _, c := range []kvmapi.IRQChip{st.IRQChip.PICMaster, st.IRQChip.PICSlave, st.IRQChip.IOAPIC} {
		if err := m.vm.SetIRQChip(c); err != nil {
			return fmt.Errorf("set irqchip %d: %w", c.ChipID, err)
		}
	}
	if err := m.vm.SetPIT2(st.IRQChip.PIT); err != nil {
		return fmt.Errorf("set pit: %w", err)
	}
	clock := kvmapi.ClockData{Clock: st.Clock.Clock}
	if err := m.vm.SetClock(clock); err != nil {
		return fmt.Errorf("set clock: %w", err)
	}
	byID := map[string]devstate.State{}
	for _, d := range st.Devices {
		byID[d.ID] = d
	}
	for _, d := range m.stateful {
		if err := d.RestoreState(byID[d.id]); err != nil {
			return err
		}
	}
	m.pci.RemapAll() // BARs live in the restored config spaces
	return nil
}

// SnapshotResult says what Snapshot did.
type SnapshotResult struct {
	SnapshotStats
	Paused time.Duration // how long the guest was stopped
}

// Snapshot stops the guest at a consistent cut, writes its state, cfg and
// memory to path, and lets it go on (unless it was paused already).
func (m *Machine) Snapshot(ctx context.Context, path string, cfg SnapshotConfig) (SnapshotResult, error) {
	start := time.Now()
	var res SnapshotResult
	err := m.WithPaused(ctx, func() error {
		st, err := m.SaveState()
		if err != nil {
			return err
		}
		res.SnapshotStats, err = WriteSnapshot(path, st, cfg, m.mem)
		return err
	})
	res.Paused = time.Since(start)
	return res, err
}

// Paused reports whether the vCPUs are paused.
func (m *Machine) Paused() bool {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	return m.paused > 0
}

// Config returns the configuration the machine was built with.
func (m *Machine) Config() Config { return m.cfg }

// QuiesceDevices stops every stateful device at a request boundary.
func (m *Machine) QuiesceDevices(ctx context.Context) error {
	for i, d := range m.stateful {
		if err := d.Quiesce(ctx); err != nil {
			for _, e := range m.stateful[:i] {
				_ = e.Resume()
			}
			return fmt.Errorf("quiesce %s: %w", d.id, err)
		}
	}
	return nil
}

// ResumeDevices lets quiesced devices go on. After HandOver it refuses
// with ErrHandedOver and the devices stay quiesced; after StartFromPaused
// they stay quiesced until Resume lets the vCPUs run.
func (m *Machine) ResumeDevices() error {
	m.pauseMu.Lock()
	handedOver, held := m.handedOver, m.devicesHeld
	m.pauseMu.Unlock()
	if handedOver {
		return ErrHandedOver
	}
	if held {
		return nil // StartFromPaused: the vCPUs' Resume lets them go
	}
	return m.resumeDevices()
}

func (m *Machine) resumeDevices() error {
	var errs []error
	for _, d := range m.stateful {
		if err := d.Resume(); err != nil {
			errs = append(errs, fmt.Errorf("resume %s: %w", d.id, err))
		}
	}
	return errors.Join(errs...)
}

// powerOnLegacy is the state of the legacy devices that states before
// version 3 left out, as a new machine has them.
func powerOnLegacy() []devstate.State {
	var out []devstate.State
	for _, d := range []devstate.Stateful{NewI8042(nil), NewRTC(nil)} {
		s, err := d.SaveState()
		if err != nil {
			panic(fmt.Sprintf("power-on state of %s: %v", d.StateID(), err)) // never fails
		}
		out = append(out, s)
	}
	return out
}

// Devices lists the stateful devices as "kind id".
func (m *Machine) Devices() []string {
	var out []string
	for _, d := range m.stateful {
		out = append(out, d.kind+" "+d.id)
	}
	return out
}
