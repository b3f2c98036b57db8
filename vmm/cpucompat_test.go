package vmm

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/kvmapi"
)

func amdCPUID(leaf1ECX, leaf7EBX uint32) []kvmapi.CPUIDEntry {
	return []kvmapi.CPUIDEntry{
		{Function: 0, EAX: 0xd, EBX: 0x68747541, ECX: 0x444d4163, EDX: 0x69746e65}, // AuthenticAMD
		{Function: 1, EBX: 0x00010800, ECX: leaf1ECX, EDX: 0x178bfbff},
		{Function: 7, Index: 0, Flags: kvmapi.CPUIDFlagSignificantIndex, EBX: leaf7EBX},
		{Function: 7, Index: 1, Flags: kvmapi.CPUIDFlagSignificantIndex, EAX: 0x10},
		{Function: 4, EAX: 0x121}, // a description, never compared
	}
}

func TestCheckCPUID(t *testing.T) {
	here := amdCPUID(0xf6d83203, 0x219c07ab)
	intel := amdCPUID(0xf6d83203, 0x219c07ab)
	intel[0].EBX, intel[0].ECX, intel[0].EDX = 0x756e6547, 0x6c65746e, 0x49656e69 // GenuineIntel
	described := amdCPUID(0xf6d83203, 0x219c07ab)
	described[4].EAX = 0x3ff

	tests := []struct {
		name  string
		saved []kvmapi.CPUIDEntry
		want  string // "" for compatible
	}{
		{"same", amdCPUID(0xf6d83203, 0x219c07ab), ""},
		{"fewer features than here", amdCPUID(0x00d83203, 0x0000002b), ""},
		{"descriptive leaves differ", described, ""},
		{"another vendor", intel, `"GenuineIntel" CPU, this host's is "AuthenticAMD"`},
		{"SGX missing here", amdCPUID(0xf6d83203, 0x219c07ab|1<<2), "7.0.EBX bits 2"},
		{"two words", amdCPUID(0xf6d83203|1<<2, 0x219c07ab|1<<2|1<<16), "1.ECX bits 2; 7.0.EBX bits 2,16"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkCPUID(tt.saved, here)
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestCheckTSC(t *testing.T) {
	tests := []struct {
		name          string
		saved, here   uint32
		scaling, fits bool
	}{
		{"unknown saved rate", 0, 2_600_000, false, true},
		{"unknown rate here", 2_600_000, 0, false, true},
		{"same", 2_600_000, 2_600_000, false, true},
		{"slower within tolerance", 2_599_500, 2_600_000, false, true},
		{"faster: KVM catches up", 3_000_000, 2_600_000, false, true},
		{"slower: cannot scale", 2_000_000, 2_600_000, false, false},
		{"slower with scaling", 2_000_000, 2_600_000, true, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkTSC(tt.saved, tt.here, tt.scaling)
			if tt.fits {
				assert.NoError(t, err)
			} else {
				assert.ErrorContains(t, err, "cannot scale")
			}
		})
	}
}
