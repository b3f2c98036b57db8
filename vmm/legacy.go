package vmm

import (
	"context"
	"fmt"
	"sync"
	"time"

	"govmm/vmm/devstate"
)

// I8042 is the part of a PS/2 keyboard controller that a guest without
// a keyboard needs: enough of the command set for Linux's probe to finish
// at once, and the CPU reset line (command 0xfe), which is how Linux
// reboots with reboot=k. Ports 0x60 (data) and 0x64 (status/command).
type I8042 struct {
	reset func() // called when the guest pulses the reset line

	mu      sync.Mutex
	ctr     uint8 // controller configuration byte
	out     []byte
	pending uint8 // command waiting for its data byte (0: none)
}

const (
	I8042Base = 0x60
	I8042Size = 5 // 0x60..0x64

	i8042StatusOBF = 0x01 // output buffer full
	i8042StatusSys = 0x04 // system flag: passed self-test

	i8042CmdReadCTR   = 0x20
	i8042CmdWriteCTR  = 0x60
	i8042CmdDisAux    = 0xa7
	i8042CmdEnAux     = 0xa8
	i8042CmdAuxTest   = 0xa9
	i8042CmdSelfTest  = 0xaa
	i8042CmdKbdTest   = 0xab
	i8042CmdDisKbd    = 0xad
	i8042CmdEnKbd     = 0xae
	i8042CmdWriteOutP = 0xd1
	i8042CmdResetCPU  = 0xfe
)

var _ Device = (*I8042)(nil)

// NewI8042 returns a controller that calls reset on 0xfe.
func NewI8042(reset func()) *I8042 { return &I8042{reset: reset, ctr: 0x45} }

// Name implements Device.
func (k *I8042) Name() string { return "i8042" }

// Read implements Device.
func (k *I8042) Read(off uint64, data []byte) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var v uint8
	switch off {
	case 0: // data
		if len(k.out) > 0 {
			v = k.out[0]
			k.out = k.out[1:]
		}
	case 4: // status
		v = i8042StatusSys
		if len(k.out) > 0 {
			v |= i8042StatusOBF
		}
	}
	for i := range data {
		data[i] = v
	}
}

// Write implements Device.
func (k *I8042) Write(off uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	v := data[0]
	k.mu.Lock()
	reset := false
	switch off {
	case 0: // data: the argument of a pending command, or for the keyboard
		switch k.pending {
		case i8042CmdWriteCTR:
			k.ctr = v
		}
		k.pending = 0
	case 4: // command
		switch v {
		case i8042CmdReadCTR:
			k.out = append(k.out[:0], k.ctr)
		case i8042CmdWriteCTR, i8042CmdWriteOutP:
			k.pending = v
		case i8042CmdSelfTest:
			k.out = append(k.out[:0], 0x55)
		case i8042CmdKbdTest, i8042CmdAuxTest:
			k.out = append(k.out[:0], 0x00)
		case i8042CmdResetCPU:
			reset = true
		}
	}
	k.mu.Unlock()
	if reset {
		k.reset()
	}
}

const (
	i8042Kind         = "i8042"
	i8042StateVersion = 1
	i8042OutMax       = 16 // replies are one byte; a few queued at most
)

var _ devstate.Stateful = (*I8042)(nil)

// i8042State is the controller's saved state, version 1: the
// configuration byte, the command waiting for its data byte, and the
// replies the guest has not read yet.
type i8042State struct {
	CTR, Pending uint8
	Out          []byte
}

func (s *i8042State) walk(c *devstate.Codec) {
	c.U8(&s.CTR)
	c.U8(&s.Pending)
	c.Bytes(&s.Out, i8042OutMax)
}

// StateID implements devstate.Stateful.
func (k *I8042) StateID() string { return k.Name() }

// StateKind implements devstate.Stateful.
func (k *I8042) StateKind() string { return i8042Kind }

// Quiesce implements devstate.Stateful: only vCPUs touch the controller.
func (k *I8042) Quiesce(context.Context) error { return nil }

// Resume implements devstate.Stateful.
func (k *I8042) Resume() error { return nil }

// SaveState implements devstate.Stateful.
func (k *I8042) SaveState() (devstate.State, error) {
	k.mu.Lock()
	s := i8042State{CTR: k.ctr, Pending: k.pending, Out: k.out}
	data := devstate.Encode(s.walk)
	k.mu.Unlock()
	return devstate.State{ID: k.StateID(), Kind: i8042Kind, Version: i8042StateVersion, Data: data}, nil
}

// RestoreState implements devstate.Stateful.
func (k *I8042) RestoreState(st devstate.State) error {
	if st.Kind != i8042Kind || st.Version != i8042StateVersion {
		return fmt.Errorf("i8042: restore %s version %d: not a %s version %d state", st.Kind, st.Version, i8042Kind, i8042StateVersion)
	}
	var s i8042State
	if err := devstate.Decode(st.Data, s.walk); err != nil {
		return fmt.Errorf("i8042: restore: %w", err)
	}
	k.mu.Lock()
	k.ctr, k.pending, k.out = s.CTR, s.Pending, s.Out
	k.mu.Unlock()
	return nil
}

// RTC is the CMOS real-time clock (ports 0x70/0x71), reading the host's
// time in UTC, BCD, 24-hour mode. Writes to the clock are ignored; the
// rest of CMOS RAM is plain storage.
type RTC struct {
	now func() time.Time

	mu    sync.Mutex
	index uint8
	ram   [128]uint8
}

const (
	RTCBase = 0x70
	RTCSize = 2
)

var _ Device = (*RTC)(nil)

// NewRTC returns a clock reading now (time.Now when nil).
func NewRTC(now func() time.Time) *RTC {
	if now == nil {
		now = time.Now
	}
	r := &RTC{now: now}
	r.ram[0x0a] = 0x26 // 32.768 kHz, 1024 Hz; update not in progress
	r.ram[0x0b] = 0x02 // 24-hour, BCD
	r.ram[0x0d] = 0x80 // RAM and time valid
	return r
}

// Name implements Device.
func (r *RTC) Name() string { return "rtc-cmos" }

func bcd(v int) uint8 { return uint8(v/10<<4 | v%10) }

// Read implements Device.
func (r *RTC) Read(off uint64, data []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var v uint8
	if off == 1 {
		t := r.now().UTC()
		switch r.index {
		case 0x00:
			v = bcd(t.Second())
		case 0x02:
			v = bcd(t.Minute())
		case 0x04:
			v = bcd(t.Hour())
		case 0x06:
			v = bcd(int(t.Weekday()) + 1)
		case 0x07:
			v = bcd(t.Day())
		case 0x08:
			v = bcd(int(t.Month()))
		case 0x09:
			v = bcd(t.Year() % 100)
		case 0x32:
			v = bcd(t.Year() / 100)
		case 0x0c:
			v = 0 // no interrupt flags
		default:
			v = r.ram[r.index]
		}
	}
	for i := range data {
		data[i] = v
	}
}

// Write implements Device.
func (r *RTC) Write(off uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch off {
	case 0:
		r.index = data[0] & 0x7f // bit 7 masks NMIs
	case 1:
		switch r.index {
		case 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0a, 0x0c, 0x0d:
			// the clock and its status registers are read-only here
		default:
			r.ram[r.index] = data[0]
		}
	}
}

const (
	rtcKind         = "rtc-cmos"
	rtcStateVersion = 1
)

var _ devstate.Stateful = (*RTC)(nil)

// rtcState is the CMOS's saved state, version 1: the index register the
// guest latched with its last write to port 0x70, and the 128 bytes of
// CMOS RAM (status registers included). The clock itself is the host's
// time and is not saved.
type rtcState struct {
	Index uint8
	RAM   [128]uint8
}

func (s *rtcState) walk(c *devstate.Codec) {
	c.U8(&s.Index)
	c.Fixed(s.RAM[:])
	if c.Decoding() && s.Index >= uint8(len(s.RAM)) {
		c.Fail(fmt.Errorf("cmos index %#x", s.Index))
	}
}

// StateID implements devstate.Stateful.
func (r *RTC) StateID() string { return r.Name() }

// StateKind implements devstate.Stateful.
func (r *RTC) StateKind() string { return rtcKind }

// Quiesce implements devstate.Stateful: only vCPUs touch the CMOS.
func (r *RTC) Quiesce(context.Context) error { return nil }

// Resume implements devstate.Stateful.
func (r *RTC) Resume() error { return nil }

// SaveState implements devstate.Stateful.
func (r *RTC) SaveState() (devstate.State, error) {
	r.mu.Lock()
	s := rtcState{Index: r.index, RAM: r.ram}
	r.mu.Unlock()
	return devstate.State{ID: r.StateID(), Kind: rtcKind, Version: rtcStateVersion, Data: devstate.Encode(s.walk)}, nil
}

// RestoreState implements devstate.Stateful.
func (r *RTC) RestoreState(st devstate.State) error {
	if st.Kind != rtcKind || st.Version != rtcStateVersion {
		return fmt.Errorf("rtc: restore %s version %d: not a %s version %d state", st.Kind, st.Version, rtcKind, rtcStateVersion)
	}
	var s rtcState
	if err := devstate.Decode(st.Data, s.walk); err != nil {
		return fmt.Errorf("rtc: restore: %w", err)
	}
	r.mu.Lock()
	r.index, r.ram = s.Index, s.RAM
	r.mu.Unlock()
	return nil
}

// ExitPort is govmm's own one-byte device at ExitPortBase: the guest's init
// writes an exit status to it (a command's status, or 0 at poweroff) and
// the machine stops with that status.
type ExitPort struct {
	exit func(status int)
}

// ExitPortBase is the I/O port of the exit device.
const ExitPortBase = 0x600

var _ Device = (*ExitPort)(nil)

// Name implements Device.
func (e *ExitPort) Name() string { return "exit-port" }

// Read implements Device: reads as zero, so a guest can probe for it.
func (e *ExitPort) Read(off uint64, data []byte) {
	for i := range data {
		data[i] = 0
	}
}

// Write implements Device.
func (e *ExitPort) Write(off uint64, data []byte) {
	if off == 0 && len(data) > 0 {
		e.exit(int(data[0]))
	}
}
