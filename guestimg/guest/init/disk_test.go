package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestDiskContent(t *testing.T) {
	t.Parallel()
	with := func(off int, magic string) []byte {
		b := make([]byte, probeSize)
		copy(b[off:], magic)
		return b
	}
	tests := []struct {
		name string
		head []byte
		want string
	}{
		{"blank", make([]byte, probeSize), ""},
		{"blank short read", make([]byte, 64<<10), ""},
		{"ext4 superblock", with(1080, "\x53\xef"), "ext2/3/4"},
		{"byte-swapped magic is not ext", with(1080, "\xef\x53"), "unrecognized data (first non-zero byte at offset 1080)"},
		{"xfs", with(0, "XFSB"), "XFS"},
		{"mbr", with(510, "\x55\xaa"), "MBR boot sector"},
		{"gpt", with(512, "EFI PART"), "GPT partition table"},
		{"btrfs", with(0x10040, "_BHRfS_M"), "btrfs"},
		{"swap", with(4086, "SWAPSPACE2"), "swap"},
		{"stray byte late", with(probeSize-1, "x"), "unrecognized data (first non-zero byte at offset 1048575)"},
		{"tiny disk", make([]byte, 1024), "a disk too small for ext4"},
		{"empty read", nil, "a disk too small for ext4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, diskContent(tt.head))
		})
	}
}
