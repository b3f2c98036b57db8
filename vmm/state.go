package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sort"
	"time"

	"govmm/kvmapi"
	"govmm/vmm/devstate"
)

// MachineState is the only description of a machine at one instant.
// Snapshot files, migration and every replication epoch use it unchanged;
// guest pages travel beside it. docs/STATE.md documents the encoding.
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
// pending events), then REGS, SREGS, XCRS, XSAVE, LAPIC, MSRS, DEBUGREGS,
// and VCPU_EVENTS last. Then the PICs, IOAPIC, PIT, the KVM clock and every
// device.
func (m *Machine) SaveState() (*MachineState, error) {
	st := &MachineState{
		VCPUs:  make([]VCPUState, len(m.vcpus)),
		Memory: MemoryLayout{MemSize: m.cfg.MemSize, CPUs: m.cfg.CPUs},
	}
	err := m.OnVCPUs(func(id int, fd *kvmapi.VCPU) error {
		v, err := m.saveVCPU(fd)
		if err != nil {
			return fmt.Errorf("vcpu %d: %w", id, err)
		}
		v.CPUID = append([]kvmapi.CPUIDEntry(nil), m.vcpus[id].cpuid...)
		st.VCPUs[id] = v
		if id == 0 {
			if st.TSCKHz, err = fd.TSCKHz(); err != nil {
				return fmt.Errorf("vcpu %d: get tsc khz: %w", id, err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if st.IRQChip, err = m.saveIRQChip(); err != nil {
		return nil, err
	}
	if st.Clock, err = m.vm.Clock(); err != nil {
		return nil, fmt.Errorf("get clock: %w", err)
	}
	for _, d := range m.stateful {
		s, err := d.SaveState()
		if err != nil {
			return nil, err
		}
		st.Devices = append(st.Devices, s)
	}
	sort.Slice(st.Devices, func(i, j int) bool { return st.Devices[i].ID < st.Devices[j].ID })
	return st, nil
}

func (m *Machine) saveVCPU(fd *kvmapi.VCPU) (VCPUState, error) {
	var v VCPUState
	var err error
	if v.MPState, err = fd.MPState(); err != nil {
		return v, fmt.Errorf("get mp_state: %w", err)
	}
	if v.Regs, err = fd.Regs(); err != nil {
		return v, fmt.Errorf("get regs: %w", err)
	}
	if v.Sregs, err = fd.Sregs(); err != nil {
		return v, fmt.Errorf("get sregs: %w", err)
	}
	if v.XCRs, err = fd.XCRs(); err != nil {
		return v, fmt.Errorf("get xcrs: %w", err)
	}
	x, err := fd.Xsave(m.xsave)
	if err != nil {
		return v, fmt.Errorf("get xsave: %w", err)
	}
	v.Xsave = x.Region
	if v.LAPIC, err = fd.LAPIC(); err != nil {
		return v, fmt.Errorf("get lapic: %w", err)
	}
	v.MSRs = make([]kvmapi.MSREntry, len(m.msrs))
	for i, idx := range m.msrs {
		v.MSRs[i].Index = idx
	}
	if err := fd.MSRs(v.MSRs); err != nil {
		return v, fmt.Errorf("get msrs: %w", err)
	}
	if v.DebugRegs, err = fd.DebugRegs(); err != nil {
		return v, fmt.Errorf("get debugregs: %w", err)
	}
	if v.Events, err = fd.VCPUEvents(); err != nil {
		return v, fmt.Errorf("get vcpu events: %w", err)
	}
	return v, nil
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
			if err := checkCPUID(saved, ShapeCPUID(m.cpuid, i, m.cfg.CPUs)); err != nil {
				return fmt.Errorf("%w: vcpu %d: %w", ErrStateMismatch, i, err)
			}
		}
	}
	if err := checkTSC(st.TSCKHz, m.tscKHz, m.sys.CheckExtension(kvmapi.CapTSCControl) > 0); err != nil {
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

// Snapshot stops the guest at a consistent cut, writes its state and
// memory to path, and lets it go on (unless it was paused already).
func (m *Machine) Snapshot(ctx context.Context, path string) (SnapshotResult, error) {
	start := time.Now()
	var res SnapshotResult
	err := m.WithPaused(ctx, func() error {
		st, err := m.SaveState()
		if err != nil {
			return err
		}
		res.SnapshotStats, err = WriteSnapshot(path, st, m.mem)
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

// Encoding (docs/STATE.md): a 24-byte header — magic "GOVMMSTA", format
// version (u16), reserved (u16), body length (u64), CRC32C of the body
// (u32) — then the body as length-prefixed sections written with
// devstate.Encoder.
const (
	stateMagic = "GOVMMSTA"
	// StateVersion is the current format version. Readers accept every
	// version from 1 on. Version 2 added the TSC rate and each vCPU's
	// CPUID; version 3 added the i8042 and the RTC to the devices (same
	// layout: a state before it has neither, and reads as holding them at
	// power-on, which is how such a state always restored them).
	StateVersion   = 3
	stateHeaderLen = 24
	// MaxStateSize caps a decoded state before anything is allocated.
	MaxStateSize = 64 << 20
	maxMSRCount  = 1024
	maxCPUIDs    = 256 // entries per vCPU (KVM's own limit is 256)
	maxDevices   = 256
	maxXsave     = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors from UnmarshalBinary.
var (
	ErrStateMagic    = errors.New("not a govmm machine state")
	ErrStateVersion  = errors.New("machine state version not understood")
	ErrStateChecksum = errors.New("machine state checksum mismatch")
	ErrStateTooLarge = errors.New("machine state too large")
)

// walk encodes or decodes the body of a state of the given format
// version: one list of fields for MarshalBinary and UnmarshalBinary.
// Kernel structs go as they are in memory (abiView), padding included.
func (s *MachineState) walk(c *devstate.Codec, version int) {
	c.U64(&s.Memory.MemSize)
	cpus := uint32(s.Memory.CPUs)
	c.U32(&cpus)
	s.Memory.CPUs = int(cpus)
	devstate.Slice32(c, &s.VCPUs, MaxCPUs, "vcpus")
	if c.Decoding() && len(s.VCPUs) == 0 {
		c.Fail(errors.New("machine state: no vcpus"))
	}
	for i := range s.VCPUs {
		s.VCPUs[i].walk(c)
	}
	c.Exact(abiView(&s.IRQChip.PICMaster))
	c.Exact(abiView(&s.IRQChip.PICSlave))
	c.Exact(abiView(&s.IRQChip.IOAPIC))
	c.Exact(abiView(&s.IRQChip.PIT))
	c.Exact(abiView(&s.Clock))
	devstate.Slice32(c, &s.Devices, maxDevices, "devices")
	for i := range s.Devices {
		d := &s.Devices[i]
		c.String(&d.ID, 256)
		c.String(&d.Kind, 256)
		c.U16(&d.Version)
		c.Bytes(&d.Data, MaxStateSize)
	}
	if version < 2 {
		return
	}
	c.U32(&s.TSCKHz)
	for i := range s.VCPUs {
		devstate.Slice32(c, &s.VCPUs[i].CPUID, maxCPUIDs, "cpuid entries")
		for j := range s.VCPUs[i].CPUID {
			e := &s.VCPUs[i].CPUID[j]
			for _, p := range [...]*uint32{&e.Function, &e.Index, &e.Flags, &e.EAX, &e.EBX, &e.ECX, &e.EDX} {
				c.U32(p)
			}
		}
	}
}

// walk is one vCPU's kernel state, in the order of the format (the CPUID
// comes after all vCPUs, since version 2).
func (v *VCPUState) walk(c *devstate.Codec) {
	c.Exact(abiView(&v.MPState))
	c.Exact(abiView(&v.Regs))
	c.Exact(abiView(&v.Sregs))
	c.Exact(abiView(&v.XCRs))
	c.Bytes(&v.Xsave, maxXsave)
	c.Exact(abiView(&v.LAPIC))
	devstate.Slice32(c, &v.MSRs, maxMSRCount, "msrs")
	for i := range v.MSRs {
		c.U32(&v.MSRs[i].Index)
		c.U64(&v.MSRs[i].Data)
	}
	c.Exact(abiView(&v.DebugRegs))
	c.Exact(abiView(&v.Events))
}

// MarshalBinary encodes the state with header and checksum.
func (s *MachineState) MarshalBinary() ([]byte, error) {
	body := devstate.Encode(func(c *devstate.Codec) { s.walk(c, StateVersion) })
	if len(body) > MaxStateSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrStateTooLarge, len(body))
	}
	out := make([]byte, stateHeaderLen, stateHeaderLen+len(body))
	copy(out, stateMagic)
	binary.LittleEndian.PutUint16(out[8:], StateVersion)
	binary.LittleEndian.PutUint64(out[12:], uint64(len(body)))
	binary.LittleEndian.PutUint32(out[20:], crc32.Checksum(body, castagnoli))
	return append(out, body...), nil
}

// UnmarshalBinary decodes and checks a state: magic, version, length
// (against MaxStateSize before allocating), checksum, and every count.
func (s *MachineState) UnmarshalBinary(data []byte) error {
	if len(data) < stateHeaderLen {
		return fmt.Errorf("%w: %d bytes is shorter than the header", ErrStateMagic, len(data))
	}
	if string(data[:8]) != stateMagic {
		return ErrStateMagic
	}
	version := binary.LittleEndian.Uint16(data[8:])
	if version < 1 || version > StateVersion {
		return fmt.Errorf("%w: version %d, this govmm reads 1 to %d", ErrStateVersion, version, StateVersion)
	}
	n := binary.LittleEndian.Uint64(data[12:])
	if n > MaxStateSize {
		return fmt.Errorf("%w: %d bytes", ErrStateTooLarge, n)
	}
	if uint64(len(data)-stateHeaderLen) != n {
		return fmt.Errorf("machine state truncated: header says %d bytes, have %d", n, len(data)-stateHeaderLen)
	}
	body := data[stateHeaderLen:]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(data[20:]) {
		return ErrStateChecksum
	}
	var out MachineState
	if err := devstate.Decode(body, func(c *devstate.Codec) { out.walk(c, int(version)) }); err != nil {
		return fmt.Errorf("machine state: %w", err)
	}
	if version < 3 {
		out.Devices = append(out.Devices, powerOnLegacy()...)
		sort.Slice(out.Devices, func(i, j int) bool { return out.Devices[i].ID < out.Devices[j].ID })
	}
	*s = out
	return nil
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
