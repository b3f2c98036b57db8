package vmm

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
)

// snapPages are the pages sampleMemory fills: a run, a lone page, the
// last page.
var snapPages = []uint64{1, 2, 3, 5, 1000, 16383}

func snapPage(p uint64) []byte {
	b := make([]byte, guestmem.PageSize)
	for i := range b {
		b[i] = byte(p + uint64(i)*7)
	}
	return b
}

func newSampleMemory(t *testing.T, fill bool) *guestmem.Memory {
	t.Helper()
	mem, err := guestmem.New([]guestmem.Spec{{GPA: 0, Size: 64 << 20}}) // sampleState's size
	require.NoError(t, err)
	t.Cleanup(func() { mem.Close() })
	if fill {
		for _, p := range snapPages {
			require.NoError(t, mem.WriteAt(snapPage(p), guestmem.GPA(p*guestmem.PageSize)))
		}
	}
	return mem
}

func requireSampleMemory(t *testing.T, mem *guestmem.Memory) {
	t.Helper()
	want := map[uint64]bool{}
	for _, p := range snapPages {
		want[p] = true
	}
	zero := make([]byte, guestmem.PageSize)
	got := make([]byte, guestmem.PageSize)
	for p := uint64(0); p < mem.Size()/guestmem.PageSize; p++ {
		require.NoError(t, mem.ReadAt(got, guestmem.GPA(p*guestmem.PageSize)))
		if want[p] {
			require.Equal(t, snapPage(p), got, "page %d", p)
		} else if !bytes.Equal(zero, got) {
			t.Fatalf("page %d is not zero", p)
		}
	}
}

// sampleConfig is the config of the golden snapshot: a repeated name, an
// empty value.
var sampleConfig = SnapshotConfig{{"net", "none"}, {"disk", "/var/lib/a.img,ro"}, {"disk", "/b.img"}, {"mac", ""}}

// A version 3 snapshot file is pinned byte for byte, reads back as what
// was written (its config included), and version 2 and 1 files (written
// before the config, and before the container format) still read, with
// no config.
func TestSnapshotGolden(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.snap")
	stats, err := WriteSnapshot(path, sampleState(), sampleConfig, newSampleMemory(t, true))
	require.NoError(t, err)
	require.Equal(t, uint64(len(snapPages)), stats.Pages)
	require.Equal(t, uint64(16384-len(snapPages)), stats.ZeroPages)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, int64(len(b)), stats.Bytes)
	golden := filepath.Join("testdata", "snapshot", "v3.snap")
	if *updateGolden {
		require.NoError(t, os.WriteFile(golden, b, 0o644))
	}
	want, err := os.ReadFile(golden)
	require.NoError(t, err)
	require.Equal(t, want, b, "snapshot layout changed: bump snapVersion, keep reading the old one (-update-golden rewrites)")

	for version, file := range map[uint16]string{1: "v1.snap", 2: "v2.snap", 3: "v3.snap"} {
		p := filepath.Join("testdata", "snapshot", file)
		mem := newSampleMemory(t, false)
		st, err := ReadSnapshot(p, mem)
		require.NoError(t, err, file)
		wantState := sampleState()
		if version == 1 {
			wantState = sampleStateAt(3) // v1 files were written with a version 3 state
		}
		require.Equal(t, wantState, st, file)
		requireSampleMemory(t, mem)
		st, err = ReadSnapshotState(p)
		require.NoError(t, err, file)
		require.Equal(t, wantState, st, file)
		h, err := ReadSnapshotHeader(p)
		require.NoError(t, err, file)
		require.Equal(t, version, h.Version, file)
		require.Equal(t, wantState, h.State, file)
		if version >= 3 {
			require.Equal(t, sampleConfig, h.Config, file)
		} else {
			require.Nil(t, h.Config, file)
		}
	}
}

// An empty config is written and read back as empty, not as absent; a
// config a reader would refuse is never written.
func TestSnapshotConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "empty.snap")
	_, err := WriteSnapshot(p, sampleState(), nil, newSampleMemory(t, true))
	require.NoError(t, err)
	h, err := ReadSnapshotHeader(p)
	require.NoError(t, err)
	require.NotNil(t, h.Config)
	require.Empty(t, h.Config)

	long := string(bytes.Repeat([]byte{'x'}, maxSettingValue+1))
	for name, cfg := range map[string]SnapshotConfig{
		"no name":    {{"", "x"}},
		"long value": {{"disk", long}},
		"too many":   make(SnapshotConfig, maxConfigSettings+1),
		"long name":  {{long[:maxSettingName+1], "x"}},
	} {
		p := filepath.Join(dir, name)
		_, err := WriteSnapshot(p, sampleState(), cfg, newSampleMemory(t, true))
		require.Error(t, err, name)
		require.NoFileExists(t, p, name)
	}
}

// A damaged or foreign snapshot is refused with ErrSnapshot and the
// container's reason, never with a machine state.
func TestSnapshotRefusals(t *testing.T) {
	good, err := os.ReadFile(filepath.Join("testdata", "snapshot", "v3.snap"))
	require.NoError(t, err)
	v2, err := os.ReadFile(filepath.Join("testdata", "snapshot", "v2.snap"))
	require.NoError(t, err)
	v1, err := os.ReadFile(filepath.Join("testdata", "snapshot", "v1.snap"))
	require.NoError(t, err)
	state, err := sampleState().MarshalBinary()
	require.NoError(t, err)
	mutate := func(b []byte, f func([]byte)) []byte { b = bytes.Clone(b); f(b); return b }
	// build writes a snapshot of the given sections under a valid checksum.
	build := func(sections ...container.Section) []byte {
		var b bytes.Buffer
		w, err := container.NewWriter(&b, container.MagicSnapshot, snapVersion)
		require.NoError(t, err)
		for _, s := range sections {
			require.NoError(t, w.Section(s.Type, s.Payload))
		}
		require.NoError(t, w.Close())
		return b.Bytes()
	}
	config := devstate.Encode(sampleConfig.walk)
	stateSec := container.Section{Type: container.TypeState, Payload: state}
	configSec := container.Section{Type: container.TypeConfig, Payload: config}
	// v2build writes a version 2 file.
	v2build := func(sections ...container.Section) []byte {
		b := build(sections...)
		binary.LittleEndian.PutUint16(b[8:], 2)
		sum := crc32.Checksum(b[:len(b)-container.EndSize], castagnoli)
		binary.LittleEndian.PutUint32(b[len(b)-4:], sum)
		return b
	}
	var outside container.PageSection
	outside.Add(64<<20, snapPage(1)) // one page past the end of memory
	var inside container.PageSection
	inside.Add(0, snapPage(1))
	cases := map[string]struct {
		data []byte
		want error
	}{
		"empty":              {nil, container.ErrNotContainer},
		"foreign":            {append([]byte("NOTASNAP"), good[8:]...), container.ErrNotContainer},
		"version 4":          {mutate(good, func(b []byte) { binary.LittleEndian.PutUint16(b[8:], 4) }), container.ErrVersion},
		"truncated in state": {good[:40], container.ErrTruncated},
		"truncated in pages": {good[:len(good)-200], container.ErrTruncated},
		"no end":             {good[:len(good)-container.EndSize], container.ErrTruncated},
		"flipped page bit":   {mutate(good, func(b []byte) { b[len(b)-100] ^= 0x40 }), container.ErrChecksum},
		"trailing bytes":     {append(bytes.Clone(good), 0), container.ErrFormat},
		"no state":           {build(), container.ErrFormat},
		"pages first":        {build(container.Section{Type: container.TypePages, Payload: inside.Payload()}), container.ErrFormat},
		"two states":         {build(container.Section{Type: container.TypeState, Payload: state}, container.Section{Type: container.TypeState, Payload: state}), container.ErrFormat},
		"page outside":       {build(stateSec, configSec, container.Section{Type: container.TypePages, Payload: outside.Payload()}), guestmem.ErrOutOfRange},
		"disk section":       {build(stateSec, configSec, container.Section{Type: container.TypeDisk, Payload: container.AppendDisk(nil, 0, 0, 1, []byte{1})}), container.ErrFormat},
		"no config":          {build(stateSec, container.Section{Type: container.TypePages, Payload: inside.Payload()}), container.ErrFormat},
		"config first":       {build(configSec, stateSec), container.ErrFormat},
		"two configs":        {build(stateSec, configSec, configSec), container.ErrFormat},
		"config in v2":       {v2build(stateSec, configSec), container.ErrFormat},
		"config trailing":    {build(stateSec, container.Section{Type: container.TypeConfig, Payload: append(bytes.Clone(config), 0)}), container.ErrFormat},
		"config too many":    {build(stateSec, container.Section{Type: container.TypeConfig, Payload: []byte{0xff, 0xff, 0, 0}}), container.ErrTooLarge},
		"v2 flipped":         {mutate(v2, func(b []byte) { b[len(b)-100] ^= 0x40 }), container.ErrChecksum},
		"v1 flipped":         {mutate(v1, func(b []byte) { b[len(b)-100] ^= 0x40 }), container.ErrChecksum},
		"v1 truncated":       {v1[:len(v1)-200], container.ErrTruncated},
	}
	dir := t.TempDir()
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(dir, name)
			require.NoError(t, os.WriteFile(p, c.data, 0o644))
			st, err := ReadSnapshot(p, newSampleMemory(t, false))
			require.ErrorIs(t, err, ErrSnapshot)
			require.ErrorIs(t, err, c.want)
			require.Nil(t, st)
		})
	}
}

// Any bytes as a config section: refused with an error or decoded to a
// config that encodes back to exactly those bytes, never a panic or an
// allocation past the caps.
func FuzzSnapshotConfig(f *testing.F) {
	f.Add(devstate.Encode(sampleConfig.walk))
	empty := SnapshotConfig{}
	f.Add(devstate.Encode(empty.walk))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, data []byte) {
		var cfg SnapshotConfig
		if err := devstate.Decode(data, cfg.walk); err != nil {
			return
		}
		require.LessOrEqual(t, len(cfg), maxConfigSettings)
		require.Equal(t, data, devstate.Encode(cfg.walk))
	})
}
