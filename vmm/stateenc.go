package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"sort"

	"govmm/kvmapi"
	"govmm/vmm/container"
	"govmm/vmm/devstate"
)

// A MachineState is encoded as a GOVMMSTA container (package container,
// docs/FORMATS.md): a machine section (shape and TSC rate), one vcpu
// section per vCPU, an irqchip section, a clock section and one device
// section per device, in that order. One walk (MachineState.sections)
// encodes and decodes them, each section's fields through a
// devstate.Codec, so that save and restore cannot drift apart.
const (
	// StateVersion is the current format version. Readers accept every
	// version from 1 on. Version 2 added the TSC rate and each vCPU's
	// CPUID; version 3 added the i8042 and the RTC to the devices (same
	// layout: a state before it has neither, and reads as holding them at
	// power-on, which is how such a state always restored them); version
	// 4 is the same fields in typed container sections.
	StateVersion = 4
	// MaxStateSize caps an encoded state before anything is allocated.
	MaxStateSize = 64 << 20
	maxMSRCount  = 1024
	maxCPUIDs    = 256 // entries per vCPU (KVM's own limit is 256)
	maxDevices   = 256
	maxXsave     = 1 << 20
	maxVCPUBytes = 2 << 20 // a vcpu section: xsave, MSRs, CPUID and the kernel structs
)

// stateFormat is what UnmarshalBinary accepts of a version 4 state: its
// section types, each with a cap checked before it is read.
var stateFormat = container.Format{
	Magic:      container.MagicState,
	MinVersion: 4, MaxVersion: StateVersion,
	Caps: map[container.Type]int{
		container.TypeMachine: 16,
		container.TypeVCPU:    maxVCPUBytes,
		container.TypeIRQChip: 4096,
		container.TypeClock:   256,
		container.TypeDevice:  MaxStateSize,
	},
}

// sections walks a version 4 state: the one list of sections and fields
// for MarshalBinary and UnmarshalBinary. Kernel structs go as they are
// in memory (abiView), padding included.
func (s *MachineState) sections(c *sectionCodec) {
	c.one(container.TypeMachine, func(d *devstate.Codec) {
		d.U64(&s.Memory.MemSize)
		cpus := uint32(s.Memory.CPUs)
		d.U32(&cpus)
		s.Memory.CPUs = int(cpus)
		d.U32(&s.TSCKHz)
	})
	each(c, container.TypeVCPU, &s.VCPUs, MaxCPUs, func(v *VCPUState, d *devstate.Codec) {
		v.walk(d)
		walkCPUID(d, &v.CPUID)
	})
	if c.decoding() && c.err == nil && len(s.VCPUs) == 0 {
		c.err = fmt.Errorf("no vcpu sections: %w", container.ErrFormat)
	}
	c.one(container.TypeIRQChip, func(d *devstate.Codec) {
		d.Exact(abiView(&s.IRQChip.PICMaster))
		d.Exact(abiView(&s.IRQChip.PICSlave))
		d.Exact(abiView(&s.IRQChip.IOAPIC))
		d.Exact(abiView(&s.IRQChip.PIT))
	})
	c.one(container.TypeClock, func(d *devstate.Codec) { d.Exact(abiView(&s.Clock)) })
	each(c, container.TypeDevice, &s.Devices, maxDevices, walkDevice)
}

// walk is one vCPU's kernel state, in the order of the format.
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

func walkCPUID(c *devstate.Codec, entries *[]kvmapi.CPUIDEntry) {
	devstate.Slice32(c, entries, maxCPUIDs, "cpuid entries")
	for j := range *entries {
		e := &(*entries)[j]
		w := [...]uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX}
		c.U32s(w[:])
		if c.Decoding() {
			e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX = w[0], w[1], w[2], w[3], w[4], w[5], w[6]
		}
	}
}

func walkDevice(d *devstate.State, c *devstate.Codec) {
	c.String(&d.ID, 256)
	c.String(&d.Kind, 256)
	c.U16(&d.Version)
	c.Bytes(&d.Data, MaxStateSize)
}

// sectionCodec runs one walk over a state's sections, encoding (each
// section's fields encoded by devstate.Encode, then written) or decoding
// (each section taken in order, its fields decoded by devstate.Decode).
// Its first error sticks.
type sectionCodec struct {
	w *container.Writer // set when encoding
	// scratch is where sections are encoded before w writes them (w
	// copies them out): kept from section to section.
	scratch *[]byte
	in      []container.Section // decoding: the sections not yet taken
	err     error
}

func (c *sectionCodec) decoding() bool { return c.w == nil }

// one walks the next section, which must be of type t.
func (c *sectionCodec) one(t container.Type, walk func(*devstate.Codec)) {
	if c.err != nil {
		return
	}
	if !c.decoding() {
		*c.scratch = devstate.EncodeAppend((*c.scratch)[:0], walk)
		c.err = c.w.Section(t, *c.scratch)
		return
	}
	if len(c.in) == 0 || c.in[0].Type != t {
		found := "the end"
		if len(c.in) > 0 {
			found = "a " + c.in[0].Type.String() + " section"
		}
		c.err = fmt.Errorf("want a %v section, found %s: %w", t, found, container.ErrFormat)
		return
	}
	if err := devstate.Decode(c.in[0].Payload, walk); err != nil {
		c.err = fmt.Errorf("%v section: %w", t, err)
	}
	c.in = c.in[1:]
}

// each walks one section of type t per element of *s. Decoding, the
// sections of type t that come next (at most max) give *s its length.
func each[T any](c *sectionCodec, t container.Type, s *[]T, max int, walk func(*T, *devstate.Codec)) {
	if c.err != nil {
		return
	}
	if c.decoding() {
		n := 0
		for n < len(c.in) && c.in[n].Type == t {
			n++
		}
		if n > max {
			c.err = fmt.Errorf("%d %v sections, at most %d: %w", n, t, max, container.ErrTooLarge)
			return
		}
		*s = nil
		if n > 0 {
			*s = make([]T, n)
		}
	}
	for i := range *s {
		c.one(t, func(d *devstate.Codec) { walk(&(*s)[i], d) })
	}
}

// MarshalBinary encodes the state as a GOVMMSTA container of the current
// version. It encodes every section in one scratch buffer, as
// EncodeState does, rather than allocating one per section.
func (s *MachineState) MarshalBinary() ([]byte, error) {
	var b bytes.Buffer
	var scratch []byte
	if err := s.marshalTo(&b, &scratch); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// UnmarshalBinary decodes and checks a state of any version: magic,
// version, checksum (before any field is decoded), every length against
// its cap before allocating. Errors wrap the container's
// (container.ErrNotContainer, ErrVersion, ErrChecksum, …).
func (s *MachineState) UnmarshalBinary(data []byte) error {
	if len(data) > MaxStateSize {
		return fmt.Errorf("machine state of %d bytes, at most %d: %w", len(data), MaxStateSize, container.ErrTooLarge)
	}
	var out MachineState
	var err error
	if h, perr := container.PeekHeader(data); perr == nil && h.Magic == container.MagicState && h.Version >= 1 && h.Version < 4 {
		err = out.decodeLegacy(data, int(h.Version))
	} else {
		err = out.decode(data)
	}
	if err != nil {
		return fmt.Errorf("machine state: %w", err)
	}
	*s = out
	return nil
}

func (s *MachineState) decode(data []byte) error {
	_, sections, err := container.Parse(data, stateFormat)
	if err != nil {
		return err
	}
	c := &sectionCodec{in: sections}
	s.sections(c)
	if c.err == nil && len(c.in) > 0 {
		c.err = fmt.Errorf("%v section after the devices: %w", c.in[0].Type, container.ErrFormat)
	}
	return c.err
}

// Versions 1 to 3 were a 24-byte header — magic "GOVMMSTA", version
// (u16), reserved (u16), body length (u64), CRC32C of the body (u32) —
// and a body of the same fields as version 4's sections, one after the
// other (the CPUIDs after all the devices). Read only.
const legacyHeaderLen = 24

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func (s *MachineState) decodeLegacy(data []byte, version int) error {
	if len(data) < legacyHeaderLen {
		return fmt.Errorf("version %d header: %w", version, container.ErrTruncated)
	}
	n := binary.LittleEndian.Uint64(data[12:])
	if n > MaxStateSize {
		return fmt.Errorf("body of %d bytes: %w", n, container.ErrTooLarge)
	}
	if uint64(len(data)-legacyHeaderLen) != n {
		return fmt.Errorf("header says %d bytes, have %d: %w", n, len(data)-legacyHeaderLen, container.ErrTruncated)
	}
	body := data[legacyHeaderLen:]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(data[20:]) {
		return container.ErrChecksum
	}
	if err := devstate.Decode(body, func(c *devstate.Codec) { s.walkLegacy(c, version) }); err != nil {
		return err
	}
	if version < 3 {
		s.Devices = append(s.Devices, powerOnLegacy()...)
		sort.Slice(s.Devices, func(i, j int) bool { return s.Devices[i].ID < s.Devices[j].ID })
	}
	return nil
}

// walkLegacy is the body of a version 1 to 3 state.
func (s *MachineState) walkLegacy(c *devstate.Codec, version int) {
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
		walkDevice(&s.Devices[i], c)
	}
	if version < 2 {
		return
	}
	c.U32(&s.TSCKHz)
	for i := range s.VCPUs {
		walkCPUID(c, &s.VCPUs[i].CPUID)
	}
}
