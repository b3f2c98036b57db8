package replicate

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

func TestDiskLogRecordsOnlyWhenArmed(t *testing.T) {
	d := NewDiskLog(bytes.NewReader(nil), 0)
	p := []byte("x")
	require.NoError(t, d.Record(0, p))
	require.Empty(t, d.Take())
	d.Arm()
	require.NoError(t, d.Record(10, p))
	p[0] = 'y' // copied
	require.Equal(t, []DiskWrite{{Off: 10, Data: []byte("x")}}, d.Take())
	require.Empty(t, d.Take())
	require.ErrorIs(t, d.Record(0, make([]byte, MaxEpochDiskBytes+1)), ErrDiskEpochFull)
	d.Disarm()
	require.NoError(t, d.Record(0, p))
	require.Empty(t, d.Take())
}

// The initial sync copies the disk (the standby's copy starts as garbage)
// while the guest writes to it; then disk writes made on the primary
// reach the standby's copy only with the checkpoint that covers them:
// after failover the standby's disk holds exactly the writes of committed
// epochs, and is synced.
func TestReplicatedDiskFollowsCheckpoints(t *testing.T) {
	kvmtest.Require(t)
	const size = 1 << 20
	primaryDisk, standbyDisk, pf, sf := diskPair(t, size)

	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	log := NewDiskLog(pf, size)
	// write is what the virtio-blk device does for a guest write: the
	// primary's disk at once, and the OnWrite hook.
	var mu sync.Mutex
	write := func(off int64, data []byte) {
		mu.Lock()
		defer mu.Unlock()
		_, err := pf.WriteAt(data, off)
		require.NoError(t, err)
		require.NoError(t, log.Record(off, data))
	}

	var atCut [][]byte // primary disk contents at each cut, by epoch
	atCutMu := sync.Mutex{}
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{sf},
		FailoverTimeout: 10 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	defer sb.Close()
	var committed uint64
	sb.onCheckpoint = func(e uint64) { committed = e }
	done := make(chan takeover, 1)
	go func() {
		m, tk, err := sb.ReceiveReplication(context.Background())
		done <- takeover{m, tk, err}
	}()
	px := newProxy(t, sb.Addr())
	rep, err := startReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second, Disks: []*DiskLog{log}}, testHooks{
		atCut: func(epoch uint64) {
			mu.Lock()
			b, err := os.ReadFile(primaryDisk)
			mu.Unlock()
			require.NoError(t, err)
			atCutMu.Lock()
			for uint64(len(atCut)) <= epoch {
				atCut = append(atCut, nil)
			}
			atCut[epoch] = b
			atCutMu.Unlock()
		}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)

	for i := 0; i < 200; i++ {
		write(int64(i*4096%size), bytes.Repeat([]byte{byte(i)}, 512))
		time.Sleep(time.Millisecond)
	}
	require.NoError(t, prim.Pause())
	px.kill()
	write(0, []byte("written after the primary died")) // can never reach the standby
	r := <-done
	require.NoError(t, r.err)
	defer r.m.Close()
	got, err := os.ReadFile(standbyDisk)
	require.NoError(t, err)
	atCutMu.Lock()
	want := atCut[r.tk.Epoch]
	atCutMu.Unlock()
	require.Equal(t, committed, r.tk.Epoch)
	require.True(t, bytes.Equal(want, got), "standby disk equals the primary's at the cut of epoch %d", r.tk.Epoch)
	final, err := os.ReadFile(primaryDisk)
	require.NoError(t, err)
	require.False(t, bytes.Equal(final, got), "writes after the last committed cut are not on the standby")
}

// A live migration copies the disk (the destination's copy starts as
// garbage) and the writes made meanwhile, the last with the final
// checkpoint.
func TestMigrationCarriesDiskWrites(t *testing.T) {
	kvmtest.Require(t)
	const size = 1 << 20
	srcDisk, dstDisk, pf, sf := diskPair(t, size)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, src.Start())
	log := NewDiskLog(pf, size)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{sf},
		Build: buildTiny})
	require.NoError(t, err)
	defer sb.Close()
	done := make(chan takeover, 1)
	go func() {
		m, err := sb.ReceiveMigration(context.Background())
		done <- takeover{m: m, err: err}
	}()
	// The guest's disk traffic, made while pre-copy runs (as a device
	// would, before the stop-and-copy quiesces it): each progress report
	// of a pre-copy round brings a burst of writes.
	n := 0
	progress := func(p Progress) {
		if p.Phase != "precopy" {
			return
		}
		for k := 0; k < 50; k++ {
			data := bytes.Repeat([]byte{byte(n + 1)}, 512)
			off := int64(n * 512 % size)
			_, err := pf.WriteAt(data, off)
			require.NoError(t, err)
			require.NoError(t, log.Record(off, data))
			n++
		}
	}
	_, err = Migrate(context.Background(), src, MigrateConfig{To: sb.Addr(), Insecure: true, Name: "tiny", Disks: []*DiskLog{log},
		Progress: progress})
	require.NoError(t, err)
	r := <-done
	require.NoError(t, r.err)
	defer r.m.Close()
	require.Greater(t, n, 0)
	want, err := os.ReadFile(srcDisk)
	require.NoError(t, err)
	got, err := os.ReadFile(dstDisk)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the destination's disk equals the source's at the cut")
}

// diskPair makes a primary disk of random contents and a standby copy of
// other random contents (what the initial sync must overwrite), open
// read-write.
func diskPair(t *testing.T, size int) (primary, standby string, pf, sf *os.File) {
	t.Helper()
	dir := t.TempDir()
	primary, standby = filepath.Join(dir, "primary.img"), filepath.Join(dir, "standby.img")
	for i, p := range []string{primary, standby} {
		b := make([]byte, size)
		_, _ = rand.NewChaCha8([32]byte{byte(i + 1)}).Read(b)
		require.NoError(t, os.WriteFile(p, b, 0o644))
	}
	var err error
	pf, err = os.OpenFile(primary, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { pf.Close() })
	sf, err = os.OpenFile(standby, os.O_RDWR, 0)
	require.NoError(t, err)
	t.Cleanup(func() { sf.Close() })
	return primary, standby, pf, sf
}
