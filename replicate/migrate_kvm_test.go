package replicate

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/replicate/stream"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

const (
	dirtyBase  = 0x400000 // 4 MiB
	dirtyPages = 512
	passGPA    = 0x8000
)

func newTiny(t *testing.T, code []byte) *vmm.Machine {
	t.Helper()
	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 2, Kernel: tinyguest.Kernel(code),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func passes(t *testing.T, m *vmm.Machine) uint64 {
	b, err := m.Memory().Slice(passGPA, 8)
	require.NoError(t, err)
	return binary.LittleEndian.Uint64(b)
}

// A guest that keeps dirtying 2 MiB is live-migrated over loopback: the
// destination's memory equals the source's page by page at the cut, the
// guest runs on there from the cut, and the source stops for good.
// With S2, and with deltas on top: every round after the
// first ships the pages the destination holds as XOR deltas.
func TestMigrateDirtyingGuest(t *testing.T) {
	for _, deltas := range []bool{false, true} {
		t.Run(fmt.Sprintf("deltas=%v", deltas), func(t *testing.T) { testMigrateDirtyingGuest(t, deltas) })
	}
}

func testMigrateDirtyingGuest(t *testing.T, deltas bool) {
	kvmtest.Require(t)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, dirtyPages, passGPA))
	require.NoError(t, src.Start())
	require.Eventually(t, func() bool { return passes(t, src) > 2 }, 30*time.Second, time.Millisecond)

	var compared int
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Build: buildTiny, Deltas: deltas})
	require.NoError(t, err)
	defer sb.Close()
	sb.beforeStart = func(dst *vmm.Machine, st *vmm.MachineState) error {
		// The source is paused at the cut: compare every page.
		for _, r := range src.Memory().Regions() {
			other, err := dst.Memory().Slice(r.GPA, r.Size)
			require.NoError(t, err)
			for off := uint64(0); off < r.Size; off += guestmem.PageSize {
				if !bytes.Equal(r.Host[off:off+guestmem.PageSize], other[off:off+guestmem.PageSize]) {
					t.Errorf("page %#x differs at the cut", uint64(r.GPA)+off)
				}
				compared++
			}
		}
		return nil
	}
	type received struct {
		m   *vmm.Machine
		err error
	}
	done := make(chan received, 1)
	go func() {
		m, _, err := sb.ReceiveMigration(context.Background())
		done <- received{m, err}
	}()

	var rounds []Progress
	res, err := Migrate(context.Background(), src, MigrateConfig{To: sb.Addr(), Insecure: true, Name: "tiny", Deltas: deltas,
		Compression: stream.CompressS2,
		StopPages:   64, MaxRounds: 5, Progress: func(p Progress) { rounds = append(rounds, p) }})
	require.NoError(t, err)
	r := <-done
	require.NoError(t, r.err)
	dst := r.m
	t.Cleanup(func() { dst.Close() })

	require.Equal(t, 64<<20/guestmem.PageSize, compared)
	require.GreaterOrEqual(t, res.Rounds, 2, "at least one pre-copy round and the stop-and-copy")
	require.Greater(t, res.PagesSent, uint64(dirtyPages))
	require.Greater(t, res.Downtime, time.Duration(0))
	require.Less(t, res.Downtime, res.TotalTime)
	require.Equal(t, "done", rounds[len(rounds)-1].Phase)
	t.Logf("migration: %d rounds, %d pages, %d bytes, total %v, downtime %v", res.Rounds, res.PagesSent, res.BytesSent, res.TotalTime, res.Downtime)

	// The source is handed over (paused, devices quiesced for good); its
	// owner stops it.
	require.True(t, src.Paused())
	require.True(t, src.HandedOver(), "the source's devices must not run on while the destination does")
	atCut := passes(t, src)
	time.Sleep(20 * time.Millisecond) // the scenario: a source that still ran would move meanwhile
	require.Equal(t, atCut, passes(t, src), "the source never runs the guest again")
	src.StopWith(vmm.Result{Reason: "migrated"})

	// The destination runs on from the cut.
	require.Eventually(t, func() bool { return passes(t, dst) > atCut+2 }, 30*time.Second, time.Millisecond)
}

// A migration whose destination vanishes midway leaves the source running.
func TestMigrateBrokenStreamSourceKeepsRunning(t *testing.T) {
	kvmtest.Require(t)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, dirtyPages, passGPA))
	require.NoError(t, src.Start())

	// A standby that accepts, then drops the connection after a moment.
	ln, err := stream.Listen("127.0.0.1:0", stream.Config{Insecure: true})
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		r, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		time.Sleep(20 * time.Millisecond) // a destination that accepts, then goes away
		r.Close()
	}()
	_, err = Migrate(context.Background(), src, MigrateConfig{To: ln.Addr().String(), Insecure: true, Name: "tiny", MaxRounds: 1000, StopPages: 0})
	require.Error(t, err)
	select {
	case <-src.Done():
		t.Fatal("the source stopped after a failed migration")
	default:
	}
	require.False(t, src.Paused())
	before := passes(t, src)
	require.Eventually(t, func() bool { return passes(t, src) > before }, 30*time.Second, time.Millisecond,
		"the guest still runs on the source")
}

// A destination of another shape refuses the source at the handshake,
// both ends say why, and the source keeps running.
func TestMigrateMismatchedDestination(t *testing.T) {
	kvmtest.Require(t)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, 8, passGPA))
	require.NoError(t, src.Start())
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true,
		Build: func(id stream.Identity) (Replica, error) {
			m, err := vmm.New(vmm.Config{MemSize: MemSize(id), CPUs: 1, Console: io.Discard}) // one vCPU fewer
			return Replica{Machine: m}, err
		}})
	require.NoError(t, err)
	defer sb.Close()
	refused := make(chan error, 1)
	sb.cfg.OnRefused = func(err error) { refused <- err }
	go func() { _, _, _ = sb.ReceiveMigration(t.Context()) }()
	_, err = Migrate(context.Background(), src, MigrateConfig{To: sb.Addr(), Insecure: true, Name: "tiny"})
	require.ErrorIs(t, err, stream.ErrMismatch)
	require.ErrorIs(t, err, stream.ErrPeer, "the source hears the destination's reason")
	require.ErrorContains(t, err, "1 vcpus on the standby, 2 on the source")
	require.ErrorIs(t, <-refused, stream.ErrMismatch)
	require.False(t, src.Paused())
}
