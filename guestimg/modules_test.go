package guestimg

import (
	"testing"

	"govmm/guestimg/internal/guestproto"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestModName(t *testing.T) {
	t.Parallel()
	tests := map[string]string{
		"kernel/arch/x86/crypto/crc32c-intel.ko": "crc32c_intel",
		"kernel/fs/ext4/ext4.ko.xz":              "ext4",
		"virtio-pci":                             "virtio_pci",
		"kernel/drivers/block/virtio_blk.ko.zst": "virtio_blk",
	}
	for in, want := range tests {
		assert.Equal(t, want, modName(in), in)
	}
}

func TestModuleClosure(t *testing.T) {
	t.Parallel()
	ix, err := loadModIndex("testdata/modules")
	require.NoError(t, err)

	tests := []struct {
		name    string
		roots   []string
		want    []string
		wantErr error
	}{
		{
			name:  "guest modules",
			roots: guestModules,
			want: []string{
				"kernel/drivers/virtio/virtio_ring.ko",
				"kernel/drivers/virtio/virtio_pci_modern_dev.ko",
				"kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
				"kernel/drivers/virtio/virtio.ko",
				"kernel/drivers/virtio/virtio_pci.ko",
				"kernel/net/core/failover.ko",
				"kernel/drivers/net/net_failover.ko",
				"kernel/drivers/net/virtio_net.ko",
				"kernel/drivers/block/virtio_blk.ko",
				"kernel/crypto/crc32c_generic.ko",
				"kernel/arch/x86/crypto/crc32c-intel.ko",
				"kernel/fs/jbd2/jbd2.ko",
				"kernel/fs/mbcache.ko",
				"kernel/lib/crc16.ko",
				"kernel/fs/ext4/ext4.ko",
			},
		},
		{name: "alias", roots: []string{"fs-ext4"}, want: []string{
			"kernel/crypto/crc32c_generic.ko", "kernel/arch/x86/crypto/crc32c-intel.ko",
			"kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko", "kernel/fs/ext4/ext4.ko",
		}},
		{name: "builtin is nothing to load", roots: []string{"8250"}, want: nil},
		{name: "dash spelling", roots: []string{"crc32c-intel"}, want: []string{"kernel/arch/x86/crypto/crc32c-intel.ko"}},
		{name: "unknown", roots: []string{"nosuch"}, wantErr: ErrModuleNotFound},
		{name: "missing dependency", roots: []string{"broken"}, wantErr: ErrModuleNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ix.closure(tt.roots)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
}

// Every module comes after everything it depends on.
func TestModuleClosureOrder(t *testing.T) {
	t.Parallel()
	ix, err := loadModIndex("testdata/modules")
	require.NoError(t, err)
	order, err := ix.closure(guestModules)
	require.NoError(t, err)
	pos := map[string]int{}
	for i, p := range order {
		pos[modName(p)] = i
	}
	for _, p := range order {
		for _, d := range ix.deps[modName(p)] {
			assert.Less(t, pos[d], pos[modName(p)], "%s before %s", d, p)
		}
	}
	dep := string(subsetModulesDep(ix, order))
	assert.Contains(t, dep, "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\n")
}

// Each module of the closure is needed for the devices of the roots that
// pull it in: the virtio core for both, ext4's helpers for the disk only.
func TestModuleNeeds(t *testing.T) {
	t.Parallel()
	ix, err := loadModIndex("testdata/modules")
	require.NoError(t, err)
	needs, err := ix.moduleNeeds(guestModules, guestModuleNeeds)
	require.NoError(t, err)
	order, err := ix.closure(guestModules)
	require.NoError(t, err)
	assert.Len(t, needs, len(order), "every module of the closure has its needs")
	both := []string{guestproto.NeedVirtioBlk, guestproto.NeedVirtioNet}
	blk := []string{guestproto.NeedVirtioBlk}
	for p, want := range map[string][]string{
		"kernel/drivers/virtio/virtio.ko":        both,
		"kernel/drivers/virtio/virtio_pci.ko":    both,
		"kernel/net/core/failover.ko":            {guestproto.NeedVirtioNet},
		"kernel/drivers/block/virtio_blk.ko":     blk,
		"kernel/fs/jbd2/jbd2.ko":                 blk,
		"kernel/arch/x86/crypto/crc32c-intel.ko": blk,
		"kernel/fs/ext4/ext4.ko":                 blk,
	} {
		assert.Equal(t, want, needs[p], p)
	}
	// A root with no needs is loaded always: its closure has none.
	always, err := ix.moduleNeeds([]string{"ext4", "crc16"}, map[string][]string{"ext4": blk})
	require.NoError(t, err)
	assert.Nil(t, always["kernel/lib/crc16.ko"])
	assert.Equal(t, blk, always["kernel/fs/jbd2/jbd2.ko"])
}

func TestParseModinfo(t *testing.T) {
	t.Parallel()
	sec := []byte("license=GPL\x00softdep=pre: crypto-crc32c post: foo\x00alias=fs-ext4\x00alias=ext3\x00" +
		"depends=jbd2,mbcache,crc16\x00name=ext4\x00\x00\x00")
	mi := parseModinfo(sec)
	assert.Equal(t, modInfo{
		Name:    "ext4",
		Depends: []string{"jbd2", "mbcache", "crc16"},
		SoftPre: []string{"crypto-crc32c"},
		Aliases: []string{"fs-ext4", "ext3"},
	}, mi)
	assert.Empty(t, parseModinfo([]byte("depends=\x00name=crc16\x00")).Depends)
}
