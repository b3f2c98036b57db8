package vmm

import (
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/kvmapi"
)

func TestShapeCPUID(t *testing.T) {
	in := []kvmapi.CPUIDEntry{
		{Function: 0x1, EBX: 0xff00_0800, ECX: 0, EDX: edxHTT},
		{Function: 0x4, Index: 0, EAX: 0xfc00_4121},
		{Function: 0xb, Index: 0, Flags: kvmapi.CPUIDFlagSignificantIndex},
		{Function: 0xb, Index: 1, Flags: kvmapi.CPUIDFlagSignificantIndex},
		{Function: 0xb, Index: 2, Flags: kvmapi.CPUIDFlagSignificantIndex},
		{Function: 0x80000008, ECX: 0x7007},
		{Function: 0x8000001e},
		{Function: 0x7, EBX: 0x1234},
	}
	out := ShapeCPUID(in, 3, 4)
	require.Len(t, out, len(in))
	require.Equal(t, uint32(0xff00_0800), in[0].EBX, "input not modified")

	byLeaf := func(f, i uint32) kvmapi.CPUIDEntry {
		for _, e := range out {
			if e.Function == f && e.Index == i {
				return e
			}
		}
		t.Fatalf("leaf %#x.%d missing", f, i)
		return kvmapi.CPUIDEntry{}
	}
	l1 := byLeaf(1, 0)
	require.Equal(t, uint32(3), l1.EBX>>24, "initial APIC ID")
	require.Equal(t, uint32(4), l1.EBX>>16&0xff, "logical processors")
	require.Equal(t, uint32(0x0800), l1.EBX&0xffff, "CLFLUSH size kept")
	require.NotZero(t, l1.ECX&ecxHypervisor)
	require.NotZero(t, l1.EDX&edxHTT)
	require.Equal(t, uint32(3), byLeaf(4, 0).EAX>>26, "cores per package - 1")
	require.Zero(t, byLeaf(4, 0).EAX>>14&0xfff, "one thread per cache")

	smt, core := byLeaf(0xb, 0), byLeaf(0xb, 1)
	require.Equal(t, uint32(1), smt.EBX)
	require.Equal(t, uint32(topoLevelSMT), smt.ECX>>8)
	require.Equal(t, uint32(2), core.EAX, "2 bits of APIC ID for 4 cores")
	require.Equal(t, uint32(4), core.EBX)
	require.Equal(t, uint32(topoLevelCore), core.ECX>>8)
	require.Equal(t, uint32(3), core.EDX, "x2APIC ID")
	require.Equal(t, uint32(2), byLeaf(0xb, 2).ECX, "end of topology: level type 0")
	require.Equal(t, uint32(3), byLeaf(0x80000008, 0).ECX&0xff)
	require.Equal(t, uint32(3), byLeaf(0x8000001e, 0).EAX)
	require.Equal(t, uint32(0x1234), byLeaf(7, 0).EBX, "other leaves untouched")

	one := ShapeCPUID(in, 0, 1)
	require.Zero(t, one[0].EDX&edxHTT, "no HTT with one CPU")
	require.Equal(t, uint32(0), one[0].EBX>>24)
}

// No performance monitoring in CPUID: Intel's leaf 0xa, AMD's PerfCtrExt
// bits and PerfMonV2 leaf are cleared; other bits of 0x80000001 stay.
func TestShapeCPUIDHidesPMU(t *testing.T) {
	in := []kvmapi.CPUIDEntry{
		{Function: 0xa, EAX: 0x07300805, EBX: 0x1, EDX: 0x8603},
		{Function: 0x80000001, ECX: ecxPerfCtrExtCore | ecxPerfCtrExtNB | ecxPerfCtrExtLLC | 1<<6 /* SSE4A */, EDX: 1 << 29},
		{Function: 0x80000022, EAX: 0x1, EBX: 0x6},
	}
	out := ShapeCPUID(in, 0, 1)
	require.Equal(t, kvmapi.CPUIDEntry{Function: 0xa}, out[0])
	require.Equal(t, uint32(1<<6), out[1].ECX)
	require.Equal(t, uint32(1<<29), out[1].EDX)
	require.Equal(t, kvmapi.CPUIDEntry{Function: 0x80000022}, out[2])
}
