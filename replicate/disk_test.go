package replicate

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/lab"
	"govmm/replicate/stream"
	"govmm/vmm"
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
// epochs, and is synced. The stream compresses (s2): the writes, each a
// repeated byte, travel compressed (stream version 12), the garbage of
// the initial copy stored.
func TestReplicatedDiskFollowsCheckpoints(t *testing.T) {
	kvmtest.Require(t)
	const size = 1 << 20
	primaryDisk, standbyDisk, pf, sf := diskPair(t, size)

	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	log := NewDiskLog(pf, size)
	// write is what the virtio-blk device does for a guest write: the
	// primary's disk at once, and the OnWrite hook. Like a quiesced
	// device, it does not write during a checkpoint's pause (inPause
	// holds mu): one that did between the cut's take of the log and
	// atCut's read of the disk would be in the read but not the cut
	// (once in a CI run under -race).
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
		Epoch: 10 * time.Millisecond, FailoverTimeout: 10 * time.Second, Disks: []*DiskLog{log}, Compression: stream.CompressS2}, testHooks{
		inPause: func() func() { mu.Lock(); return mu.Unlock },
		atCut: func(epoch uint64) {
			b, err := os.ReadFile(primaryDisk) // mu held: inPause
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
		time.Sleep(time.Millisecond) // the writes spread over several epochs
	}
	require.NoError(t, prim.Pause())
	st := rep.Stats().Stream
	require.Equal(t, "s2", st.Compression)
	t.Logf("disk: %d bytes written, %d on the wire", st.DiskBytes, st.DiskWireBytes)
	require.Less(t, st.DiskWireBytes, st.DiskBytes, "the writes compressed")
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
		m, _, err := sb.ReceiveMigration(context.Background())
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
	primary, pf = garbageFile(t, dir, "primary.img", size, 1)
	standby, sf = garbageFile(t, dir, "standby.img", size, 2)
	return primary, standby, pf, sf
}

// protectDisk starts a tiny dirtier guest and replicates it, with src
// (size bytes) as its disk, to a standby whose copy is standby, in 10 ms
// epochs; it returns once the guest is protected. The caller closes sb.
func protectDisk(t *testing.T, src *os.File, size int64, standby *os.File) (*vmm.Machine, *DiskLog, *Standby, *Replicator) {
	t.Helper()
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	log := NewDiskLog(src, size)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{standby},
		FailoverTimeout: 5 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	receive(t, sb)
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 5 * time.Second, Disks: []*DiskLog{log}})
	if err != nil {
		sb.Close()
	}
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	return prim, log, sb, rep
}

// waitCaughtUp pauses prim and waits until the standby has acknowledged a
// checkpoint taken after the pause: its memory and disks are then the
// primary's.
func waitCaughtUp(t *testing.T, prim interface{ Pause() error }, rep *Replicator) {
	t.Helper()
	require.NoError(t, prim.Pause())
	e := rep.Stats().Epoch + 1
	require.Eventually(t, func() bool { return rep.Stats().Acked > e }, 60*time.Second, time.Millisecond)
}

// A guest that writes more to disk in one epoch than a checkpoint's state
// may hold (64 MiB): the writes travel as Disk frames, the epoch ends
// early under the pressure, and the standby stays in step; nothing makes
// it take over a healthy primary.
func TestBigDiskEpoch(t *testing.T) {
	kvmtest.Require(t)
	const size = 128 << 20
	primaryDisk, standbyDisk, pf, sf := diskPair(t, size)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	log := NewDiskLog(pf, size)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{sf},
		FailoverTimeout: 5 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	defer sb.Close()
	done := receive(t, sb)
	// A long epoch: the timer does not end it while the test writes, even
	// on a loaded host under the race detector.
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 8 * time.Second, FailoverTimeout: 5 * time.Second, Disks: []*DiskLog{log}})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)

	// 96 MiB of guest writes at once, as a device would make them.
	// Each MiB differs from the others in its first bytes; filled once,
	// so that writing is quick next to the epoch.
	chunk := make([]byte, 1<<20)
	for j := range chunk {
		chunk[j] = byte(j * 7)
	}
	for i := range 96 {
		binary.LittleEndian.PutUint64(chunk, uint64(i)+1)
		_, err := pf.WriteAt(chunk, int64(i)<<20)
		require.NoError(t, err)
		require.NoError(t, log.Record(int64(i)<<20, chunk))
	}
	waitCaughtUp(t, prim, rep)
	select {
	case r := <-done:
		t.Fatalf("the standby took over a healthy primary: %v", r.err)
	default:
	}
	st := rep.Stats()
	require.True(t, st.Protected)
	require.Positive(t, st.EarlyEpochs, "disk pressure ended an epoch early")
	want, err := os.ReadFile(primaryDisk)
	require.NoError(t, err)
	got, err := os.ReadFile(standbyDisk)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the standby's disk equals the primary's")
}

// The standby's disk copy may be a block device: its size comes from
// BLKGETSIZE64, not stat, and the initial sync and checkpoints land in it.
func TestStandbyDiskOnBlockDevice(t *testing.T) {
	kvmtest.Require(t)
	const size = 4 << 20
	primaryDisk, standbyImg, pf, sf := diskPair(t, size)
	sf.Close()
	dev := loopDevice(t, standbyImg)
	bf, err := os.OpenFile(dev, os.O_RDWR, 0)
	require.NoError(t, err)
	defer bf.Close()
	n, err := DiskSize(bf)
	require.NoError(t, err)
	require.Equal(t, int64(size), n)

	prim, log, sb, rep := protectDisk(t, pf, size, bf)
	defer sb.Close()
	_, err = pf.WriteAt([]byte("written while protected"), size-100)
	require.NoError(t, err)
	require.NoError(t, log.Record(size-100, []byte("written while protected")))
	waitCaughtUp(t, prim, rep)
	want, err := os.ReadFile(primaryDisk)
	require.NoError(t, err)
	got := make([]byte, size)
	_, err = bf.ReadAt(got, 0)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the block device holds the primary's disk")
}

// loopDevice attaches path to a loop device for the test's life.
func loopDevice(t *testing.T, path string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("needs losetup for a loop device")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		// L1 loads the loop module: there a missing one is a failure.
		require.False(t, lab.InLab(), "the lab has no loop devices: %v", err)
		t.Skipf("needs loop devices: %v", err)
	}
	out, err := exec.Command("losetup", "--find", "--show", path).CombinedOutput()
	require.NoError(t, err, "losetup: %s", out)
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("losetup", "--detach", dev).Run() })
	return dev
}

// Re-protection after a failover: the standby that took over protects
// the guest with a fresh standby whose disk copy starts as garbage; the
// initial sync makes it equal to the taken-over guest's disk.
func TestReprotectionCopiesDisk(t *testing.T) {
	kvmtest.Require(t)
	const size = 2 << 20
	_, diskB, pf, fb := diskPair(t, size)
	_, diskC, _, fc := diskPair(t, size)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 16, passGPA))
	require.NoError(t, prim.Start())
	sbB, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{fb},
		FailoverTimeout: 5 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	defer sbB.Close()
	doneB := receive(t, sbB)
	px := newProxy(t, sbB.Addr())
	repA, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 5 * time.Second, Disks: []*DiskLog{NewDiskLog(pf, size)}})
	require.NoError(t, err)
	t.Cleanup(repA.Stop)
	require.Eventually(t, func() bool { return repA.Stats().Acked > 3 }, 30*time.Second, time.Millisecond)
	require.NoError(t, prim.Pause())
	px.kill()
	r := <-doneB
	require.NoError(t, r.err)
	mB := r.m
	t.Cleanup(func() { mB.Close() }) // after repB stops

	// B's guest writes to its disk (B's copy), then B protects it with C.
	_, err = fb.WriteAt([]byte("after the failover"), 4096)
	require.NoError(t, err)
	logB := NewDiskLog(fb, size)
	sbC, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Disks: []*os.File{fc},
		FailoverTimeout: 5 * time.Second, Build: buildTiny})
	require.NoError(t, err)
	defer sbC.Close()
	receive(t, sbC)
	repB, err := StartReplication(context.Background(), mB, ReplicateConfig{To: sbC.Addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 5 * time.Second, Disks: []*DiskLog{logB}})
	require.NoError(t, err)
	t.Cleanup(repB.Stop)
	waitCaughtUp(t, mB, repB)
	want, err := os.ReadFile(diskB)
	require.NoError(t, err)
	got, err := os.ReadFile(diskC)
	require.NoError(t, err)
	require.True(t, bytes.Equal(want, got), "the fresh standby's disk equals the taken-over guest's")
}
