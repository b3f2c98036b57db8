package vmm

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/kvmapi"
	"govmm/vmm/container"
	"govmm/vmm/devstate"
)

var updateGolden = flag.Bool("update-golden", false, "rewrite testdata/state golden files")

// sampleState is a state with every field set to something recognisable.
func sampleState() *MachineState {
	st := &MachineState{Memory: MemoryLayout{MemSize: 64 << 20, CPUs: 2}}
	for i := 0; i < 2; i++ {
		v := VCPUState{
			MPState: kvmapi.MPState{State: kvmapi.MPStateRunnable},
			Regs:    kvmapi.Regs{RIP: 0x100200 + uint64(i), RSP: 0x8ff0, RFLAGS: 2, RAX: 42},
			Xsave:   make([]byte, kvmapi.XsaveSize),
			MSRs:    []kvmapi.MSREntry{{Index: 0x10, Data: 12345}, {Index: 0x4b564d01, Data: 0x5001}},
		}
		v.Sregs.CR0 = 0x80000031
		v.Sregs.CS.Selector = 0x10
		v.XCRs.NrXCRs = 1
		v.XCRs.XCRs[0].Value = 7
		v.Xsave[0] = 0x7f
		v.LAPIC.Regs[0x20] = byte(i)
		v.DebugRegs.DR7 = 0x400
		v.Events.NMI.Masked = 1
		v.CPUID = []kvmapi.CPUIDEntry{
			{Function: 0, EAX: 0xd, EBX: 0x68747541, ECX: 0x444d4163, EDX: 0x69746e65},
			{Function: 7, Index: 0, Flags: kvmapi.CPUIDFlagSignificantIndex, EBX: 0x219c07ab},
			{Function: 1, EBX: uint32(i) << 24, ECX: 0xf6d83203, EDX: 0x178bfbff},
		}
		st.VCPUs = append(st.VCPUs, v)
	}
	st.IRQChip.PICMaster.ChipID = kvmapi.IRQChipPICMaster
	st.IRQChip.PICSlave.ChipID = kvmapi.IRQChipPICSlave
	st.IRQChip.IOAPIC.ChipID = kvmapi.IRQChipIOAPIC
	st.IRQChip.IOAPIC.Chip[0] = 0xfe
	st.IRQChip.PIT.Channels[0].Count = 0x10000
	st.Clock.Clock = 987654321
	st.TSCKHz = 2596120
	st.Devices = []devstate.State{
		{ID: "i8042", Kind: "i8042", Version: 1, Data: []byte{0x47, 0, 1, 0, 0, 0, 0x55}},
		{ID: "rtc-cmos", Kind: "rtc-cmos", Version: 1, Data: append([]byte{0x0b}, make([]byte, 128)...)},
		{ID: "uart-com1", Kind: "uart-16550a", Version: 1, Data: []byte{1, 2, 3}},
		{ID: "virtio-blk0", Kind: "virtio-blk", Version: 1, Data: []byte("blk")},
	}
	return st
}

// sampleStateAt is sampleState as a reader sees it in a file of an older
// version: without what later versions added.
func sampleStateAt(version int) *MachineState {
	st := sampleState()
	if version < 3 { // no i8042 and RTC: they read as at power-on
		st.Devices = st.Devices[2:]
		st.Devices = append(powerOnLegacy(), st.Devices...)
	}
	if version < 2 { // no TSC rate and CPUIDs: unknown
		st.TSCKHz = 0
		for i := range st.VCPUs {
			st.VCPUs[i].CPUID = nil
		}
	}
	return st
}

func TestStateRoundTrip(t *testing.T) {
	st := sampleState()
	b, err := st.MarshalBinary()
	require.NoError(t, err)
	var got MachineState
	require.NoError(t, got.UnmarshalBinary(b))
	require.Equal(t, *st, got)
}

// The encoding of each format version is pinned: a reader must keep
// accepting the files written by the current and the previous version.
func TestStateGolden(t *testing.T) {
	path := filepath.Join("testdata", "state", fmt.Sprintf("v%d.bin", StateVersion))
	b, err := sampleState().MarshalBinary()
	require.NoError(t, err)
	if *updateGolden {
		require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
		require.NoError(t, os.WriteFile(path, b, 0o644))
	}
	golden, err := os.ReadFile(path)
	require.NoError(t, err, "run go test ./vmm -run Golden -update-golden after a deliberate format change (and bump StateVersion)")
	require.Equal(t, golden, b, "encoding changed: bump StateVersion and keep reading v%d", StateVersion)

	// Every version stays readable, each as what it held.
	for v := 1; v <= StateVersion; v++ {
		old, err := os.ReadFile(filepath.Join("testdata", "state", fmt.Sprintf("v%d.bin", v)))
		require.NoError(t, err)
		var st MachineState
		require.NoError(t, st.UnmarshalBinary(old), "version %d", v)
		require.Equal(t, *sampleStateAt(v), st, "version %d", v)
	}
}

func TestStateRejectsBadInput(t *testing.T) {
	good, err := sampleState().MarshalBinary()
	require.NoError(t, err)
	v3, err := os.ReadFile(filepath.Join("testdata", "state", "v3.bin"))
	require.NoError(t, err)
	mutate := func(b []byte, f func([]byte)) []byte { b = bytes.Clone(b); f(b); return b }
	_, sections, err := container.Parse(good, stateFormat)
	require.NoError(t, err)
	// rebuild writes good's sections in another order or number, under a
	// valid checksum: only the walk can refuse them.
	rebuild := func(f func([]container.Section) []container.Section) []byte {
		var b bytes.Buffer
		w, err := container.NewWriter(&b, container.MagicState, StateVersion)
		require.NoError(t, err)
		for _, s := range f(slices.Clone(sections)) {
			require.NoError(t, w.Section(s.Type, s.Payload))
		}
		require.NoError(t, w.Close())
		return b.Bytes()
	}
	cases := map[string]struct {
		data []byte
		want error
	}{
		"empty":     {nil, container.ErrNotContainer},
		"foreign":   {mutate(good, func(b []byte) { copy(b, "NOTGOVMM") }), container.ErrNotContainer},
		"version":   {mutate(good, func(b []byte) { binary.LittleEndian.PutUint16(b[8:], 99) }), container.ErrVersion},
		"version 0": {mutate(good, func(b []byte) { binary.LittleEndian.PutUint16(b[8:], 0) }), container.ErrVersion},
		"flipped":   {mutate(good, func(b []byte) { b[len(b)-container.EndSize-1] ^= 1 }), container.ErrChecksum},
		"over a cap": {mutate(good, func(b []byte) {
			binary.LittleEndian.PutUint32(b[container.HeaderSize+4:], 17) // the machine section
		}), container.ErrTooLarge},
		"vcpu first": {rebuild(func(s []container.Section) []container.Section {
			s[0], s[1] = s[1], s[0]
			return s
		}), container.ErrFormat},
		"no vcpus": {rebuild(func(s []container.Section) []container.Section {
			return slices.Delete(s, 1, 3)
		}), container.ErrFormat},
		"no clock": {rebuild(func(s []container.Section) []container.Section {
			return slices.Delete(s, 4, 5)
		}), container.ErrFormat},
		"two clocks": {rebuild(func(s []container.Section) []container.Section {
			return append(s, s[4])
		}), container.ErrFormat},
		"33 vcpus": {rebuild(func(s []container.Section) []container.Section {
			for range MaxCPUs + 1 - 2 {
				s = slices.Insert(s, 1, s[1])
			}
			return s
		}), container.ErrTooLarge},
		"v3 flipped":   {mutate(v3, func(b []byte) { b[len(b)-1] ^= 1 }), container.ErrChecksum},
		"v3 too large": {mutate(v3, func(b []byte) { binary.LittleEndian.PutUint64(b[12:], 1<<40) }), container.ErrTooLarge},
		"v3 truncated": {v3[:len(v3)-1], container.ErrTruncated},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			var st MachineState
			err := st.UnmarshalBinary(c.data)
			require.ErrorIs(t, err, c.want)
		})
	}
	for _, n := range []int{container.HeaderSize - 1, container.HeaderSize, len(good) / 2, len(good) - 1} {
		var st MachineState
		require.ErrorIs(t, st.UnmarshalBinary(good[:n]), container.ErrTruncated, "truncated to %d", n)
	}
	// A body with a consistent checksum but nonsense counts.
	bad := sampleState()
	bad.VCPUs[0].MSRs = make([]kvmapi.MSREntry, maxMSRCount+1)
	b, err := bad.MarshalBinary()
	require.NoError(t, err)
	var st MachineState
	require.ErrorContains(t, st.UnmarshalBinary(b), "msrs")
	bad = sampleState()
	bad.VCPUs[1].CPUID = make([]kvmapi.CPUIDEntry, maxCPUIDs+1)
	b, err = bad.MarshalBinary()
	require.NoError(t, err)
	require.ErrorContains(t, st.UnmarshalBinary(b), "cpuid")
}

func TestUARTStateRoundTrip(t *testing.T) {
	var out syncBuffer
	u := NewUART(&out, func(bool) {})
	u.Write(uartLCR, []byte{0x03})
	u.Write(uartIER, []byte{ierRDI})
	u.Write(uartSCR, []byte{0x42})
	u.Input([]byte("pending"))
	s, err := u.SaveState()
	require.NoError(t, err)
	v := NewUART(&out, func(bool) {})
	require.NoError(t, v.RestoreState(s))
	s2, err := v.SaveState()
	require.NoError(t, err)
	require.Equal(t, s, s2)
	b := []byte{0}
	v.Read(uartRBR, b)
	require.Equal(t, byte('p'), b[0], "queued input survives")
	require.Error(t, v.RestoreState(devstate.State{Kind: "virtio-net", Version: 1}))
}

// The i8042 and the RTC keep what the guest left in them: the
// controller's configuration byte, a command waiting for its argument
// and an unread reply; the CMOS index the guest latched and its RAM.
func TestLegacyStateRoundTrip(t *testing.T) {
	k := NewI8042(func() {})
	k.Write(4, []byte{i8042CmdWriteCTR})
	k.Write(0, []byte{0x47})
	k.Write(4, []byte{i8042CmdSelfTest})
	k.Write(4, []byte{i8042CmdWriteOutP}) // waits for its data byte
	ks, err := k.SaveState()
	require.NoError(t, err)
	k2 := NewI8042(func() {})
	require.NoError(t, k2.RestoreState(ks))
	again, err := k2.SaveState()
	require.NoError(t, err)
	require.Equal(t, ks, again)
	b := []byte{0}
	k2.Read(0, b)
	require.Equal(t, byte(0x55), b[0], "the unread self-test reply survives")
	k2.Write(4, []byte{i8042CmdReadCTR})
	k2.Read(0, b)
	require.Equal(t, byte(0x47), b[0], "the configuration byte survives")

	r := NewRTC(nil)
	r.Write(0, []byte{0x40})
	r.Write(1, []byte{0x99})
	r.Write(0, []byte{0x8e}) // NMI mask bit set, index 0x0e
	rs, err := r.SaveState()
	require.NoError(t, err)
	r2 := NewRTC(nil)
	require.NoError(t, r2.RestoreState(rs))
	r2.Read(1, b)
	require.Equal(t, r.ram[0x0e], b[0], "reads the latched index")
	r2.Write(0, []byte{0x40})
	r2.Read(1, b)
	require.Equal(t, byte(0x99), b[0], "CMOS RAM survives")

	bad := rs
	bad.Data = append([]byte{0x80}, rs.Data[1:]...)
	require.ErrorContains(t, r2.RestoreState(bad), "cmos index")
	require.Error(t, r2.RestoreState(ks), "an i8042 state is not an RTC's")
	require.Error(t, k2.RestoreState(devstate.State{Kind: "i8042", Version: 1, Data: []byte{1}}), "truncated")
}

// FuzzStateBody feeds state bodies of every version, under a valid header
// and checksum, to the decoder: it must never panic, and whatever it
// accepts encodes back to a state it reads the same. A version 4 body is
// the sections between the header and the end section.
func FuzzStateBody(f *testing.F) {
	for v := 1; v <= StateVersion; v++ {
		b, err := os.ReadFile(filepath.Join("testdata", "state", fmt.Sprintf("v%d.bin", v)))
		require.NoError(f, err)
		if v < 4 {
			f.Add(uint16(v), b[legacyHeaderLen:])
		} else {
			f.Add(uint16(v), b[container.HeaderSize:len(b)-container.EndSize])
		}
	}
	f.Fuzz(func(t *testing.T, version uint16, body []byte) {
		var data []byte
		if version < 4 {
			data = make([]byte, legacyHeaderLen, legacyHeaderLen+len(body))
			copy(data, container.MagicState)
			binary.LittleEndian.PutUint16(data[8:], version)
			binary.LittleEndian.PutUint64(data[12:], uint64(len(body)))
			binary.LittleEndian.PutUint32(data[20:], crc32.Checksum(body, castagnoli))
			data = append(data, body...)
		} else {
			data = binary.LittleEndian.AppendUint16([]byte(container.MagicState), version)
			data = append(append(data, 0, 0), body...)
			sum := crc32.Checksum(data, castagnoli) // the container's rule: every byte before the end
			data = append(data, 1, 0, 0, 0, 4, 0, 0, 0)
			data = binary.LittleEndian.AppendUint32(data, sum)
		}
		var st MachineState
		if st.UnmarshalBinary(data) != nil {
			return
		}
		out, err := st.MarshalBinary()
		require.NoError(t, err)
		var again MachineState
		require.NoError(t, again.UnmarshalBinary(out))
		require.Equal(t, st, again)
	})
}
