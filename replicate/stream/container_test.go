package stream

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/vmm/container"
)

// A checkpoint is a GOVMMCKP container cut into frames: each Pages, Disk
// and State frame carries one section's payload, in order, and the End
// frame's sum is sum64 of those sections (since version 9; not the
// container's CRC32C): all of them without a key, and in a sealed session
// (version 10) only the sections that travelled compressed (Disk since
// version 12, State since 13) or as an XOR with the last state (13), the
// tags covering the rest. The receiver computes it the same way (it
// acknowledges).
func TestCheckpointIsAContainer(t *testing.T) {
	for _, tt := range []struct {
		name   string
		keyed  bool
		comp   Compression
		summed []bool // by section: pages, disk write, zero run, state, state
	}{
		{"unkeyed: every section", false, CompressNone, []bool{true, true, true, true, true}},
		{"keyed: none, all stored", true, CompressNone, []bool{false, false, false, false, false}},
		{"keyed s2: the compressed page, disk and state sections", true, CompressS2, []bool{true, true, false, true, true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			scfg, rcfg := cfgs(newFakeClock())
			if !tt.keyed {
				scfg.Key, rcfg.Key, scfg.Insecure, rcfg.Insecure = nil, nil, true, true
			}
			scfg.Compression = tt.comp
			rcfg.Disks = newMemDisks(4 << 20)
			s, r := pipePair(t, scfg, rcfg)
			run := runReceiver(t, r)
			sections := sendContainerCheckpoint(t, s)
			sum := newSum64()
			for i, sec := range sections {
				if tt.summed[i] {
					sum.Section(sec.Type, sec.Payload)
				}
			}
			require.Equal(t, sum.Sum64(), s.cur.sum, "End carries sum64 of the container's sections")
			require.NoError(t, s.Close())
			require.NoError(t, waitErr(t, run))
		})
	}
}

// sendContainerCheckpoint sends checkpoint 1 (three pages, one of them
// zero, two disk writes, two State frames), waits for its ack, and
// returns the sections of the same checkpoint written as a container.
func sendContainerCheckpoint(t *testing.T, s *Sender) []container.Section {
	state := bytes.Repeat([]byte("machine state "), 100_000) // two State frames
	disk := bytes.Repeat([]byte{0xd1}, 3000)
	require.NoError(t, s.BeginCheckpoint(1, KindEpoch))
	require.NoError(t, s.SendPage(0, page(1)))
	require.NoError(t, s.SendPage(PageSize, make([]byte, PageSize)))
	require.NoError(t, s.SendPage(1<<32, bytes.Repeat([]byte{2}, PageSize)))
	require.NoError(t, s.SendDisk(0, 512, disk))
	require.NoError(t, s.SendDisk(0, 1<<20, make([]byte, 8192)))
	require.NoError(t, s.SendState(state))
	require.NoError(t, s.EndCheckpoint())
	require.NoError(t, s.WaitAck(ctxTimeout(t, 10*time.Second), 1))

	var pages container.PageSection
	pages.Add(0, page(1))
	pages.Add(PageSize, nil)
	pages.Add(1<<32, bytes.Repeat([]byte{2}, PageSize))
	var b bytes.Buffer
	w, err := container.NewWriter(&b, container.MagicCheckpoint, checkpointVersion)
	require.NoError(t, err)
	require.NoError(t, w.Section(container.TypePages, pages.Payload()))
	require.NoError(t, w.Section(container.TypeDisk, container.AppendDisk(nil, 0, 512, len(disk), disk)))
	require.NoError(t, w.Section(container.TypeDisk, container.AppendDisk(nil, 0, 1<<20, 8192, nil)))
	require.NoError(t, w.Section(container.TypeState, state[:MaxStateChunk]))
	require.NoError(t, w.Section(container.TypeState, state[MaxStateChunk:]))
	require.NoError(t, w.Close())

	_, sections, err := container.Parse(b.Bytes(), container.Format{
		Magic: container.MagicCheckpoint, MinVersion: checkpointVersion, MaxVersion: checkpointVersion,
		Caps: map[container.Type]int{container.TypePages: MaxFramePayload, container.TypeDisk: container.MaxDiskPayload, container.TypeState: MaxStateChunk},
	})
	require.NoError(t, err)
	require.Len(t, sections, 5)
	return sections
}
