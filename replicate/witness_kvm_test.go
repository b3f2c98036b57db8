package replicate

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/guestrig"
	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
)

// Replication of tiny guests with a witness (docs/FENCING.md): a primary
// and a standby in this process, a real witness on loopback, and proxies
// between each pair that a test can partition. Each VMM's NIC is an
// output buffer into a timedSink (the wire); a goroutine stands in for
// the guest's NIC and sends a frame every millisecond through the VMM that
// runs the guest. Each test asserts on what reaches the wires.

const fencedFailover = time.Second // both ends' failover timeout here

// fencedRig is one scenario's world.
type fencedRig struct {
	t *testing.T
	w *witnessRig

	toWitnessP, toWitnessS, link *proxy // primary↔witness, standby↔witness, primary↔standby

	prim     *vmm.Machine
	fence    *Fence
	fenceLog *guestrig.ConsoleLog // what the primary's Fence logged, for failures
	node     *Node
	pOut     *OutputBuffer
	pWire    *timedSink
	disk     *DiskLog

	sb    *Standby
	sOut  *OutputBuffer
	sWire *timedSink
	done  <-chan takeover
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func newFencedRig(t *testing.T) *fencedRig {
	t.Helper()
	kvmtest.Require(t)
	r := &fencedRig{t: t, w: startWitnessRig(t)}
	r.toWitnessP, r.toWitnessS = newProxy(t, r.w.addr), newProxy(t, r.w.addr)

	r.sWire = &timedSink{}
	r.sOut = NewOutputBuffer(r.sWire, 0)
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, FailoverTimeout: fencedFailover,
		Witness: r.w.client(r.toWitnessS.addr(), "standby", testLease), Logger: quiet,
		Build: func(id stream.Identity) (Replica, error) {
			rep, err := buildTiny(id)
			rep.NICs = []NIC{{Out: r.sOut, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1}}}
			return rep, err
		}})
	require.NoError(t, err)
	t.Cleanup(func() { sb.Close() })
	r.sb = sb
	r.done = receive(t, sb)
	r.link = newProxy(t, sb.Addr())

	r.prim = newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	r.pWire = &timedSink{}
	r.pOut = NewOutputBuffer(r.pWire, 0)
	r.disk = NewDiskLog(nil, 0)
	r.fenceLog = &guestrig.ConsoleLog{Name: "fence"}
	r.fence = NewFence(FenceConfig{Lease: acquire(t, r.w.client(r.toWitnessP.addr(), "primary", testLease)),
		Witness: r.w.addr, Machine: r.prim, Outputs: []*OutputBuffer{r.pOut}, Disks: []*DiskLog{r.disk},
		Logger: slog.New(slog.NewTextHandler(r.fenceLog, nil))})
	t.Cleanup(r.fence.Close)
	require.NoError(t, r.prim.Start())
	r.node = NewNode(Booted, Takeover{}, r.fence)
	t.Cleanup(func() { _ = r.node.Unprotect() })
	r.protect()
	r.guestSends(r.pOut)
	return r
}

// protect starts replicating the primary to the standby through the link.
func (r *fencedRig) protect() *Replicator {
	r.t.Helper()
	rep, err := r.node.Protect(context.Background(), r.prim, ReplicateConfig{To: r.link.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: fencedFailover, Outputs: []*OutputBuffer{r.pOut}, Logger: quiet})
	require.NoError(r.t, err)
	require.Eventually(r.t, func() bool { return r.sb.Status().Epoch > 0 }, 10*time.Second, time.Millisecond)
	return rep
}

// guestSends stands in for the guest's NIC on one VMM: a frame every
// millisecond until the test ends.
func (r *fencedRig) guestSends(out *OutputBuffer) {
	ctx := r.t.Context()
	go func() {
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Millisecond):
				_ = out.Send([]byte{byte(i), byte(i >> 8)})
			}
		}
	}()
}

// grows waits until the wire has n more frames than now.
func grows(t *testing.T, w *timedSink, n int, what string) {
	t.Helper()
	start, _ := w.last()
	require.Eventually(t, func() bool { got, _ := w.last(); return got >= start+n }, 20*time.Second, time.Millisecond, what)
}

// A primary that hears nothing for longer than the failover timeout (cut
// from its standby and from the witness, as a stopped one would be) stops
// releasing when its lease runs out; the standby wins the next generation
// only after that, and takes over; once the old primary hears again, it is
// fenced: its vCPUs stop and its wire stays silent. At no moment do both
// wires carry frames.
func TestWitnessPrimaryCutOffIsFenced(t *testing.T) {
	r := newFencedRig(t)
	grows(t, r.pWire, 50, "the protected primary's output leaves after acks")
	g := r.fence.Generation()

	r.link.partition(true)
	r.toWitnessP.partition(true)
	tk := <-r.done
	require.NoError(t, tk.err, "the standby takes over")
	took := time.Now()
	defer tk.m.Close()
	require.NotNil(t, tk.tk.Fence)
	require.Equal(t, g+1, tk.tk.Fence.Generation())
	t.Logf("takeover at checkpoint %d, claim %v, took %v", tk.tk.Epoch, tk.tk.Claim, tk.tk.Took)
	_, lastP := r.pWire.last()
	firstS, _ := r.sWire.last()
	require.Greater(t, firstS, 0, "the standby announced the guest (RARP) under its lease")
	r.guestSends(r.sOut)
	grows(t, r.sWire, 50, "the guest's output leaves the new primary")
	detected := took.Add(-tk.tk.Took)
	require.True(t, lastP.Before(detected), "the old primary's last frame left before the standby even claimed")
	require.True(t, lastP.Before(r.sWire.first()), "and before the new primary's first")
	require.Equal(t, PhaseRunning, r.sb.Status().Phase)

	r.link.partition(false)
	r.toWitnessP.partition(false)
	select {
	case <-r.fence.Fenced():
	case <-time.After(20 * time.Second):
		t.Fatal("the old primary is not fenced once it hears from the witness again")
	}
	nP, lastP2 := r.pWire.last()
	require.Equal(t, lastP, lastP2, "not one frame from the old primary since the takeover")
	if r.fenceLog.Contains("trying again") {
		// Not a failure (the Fence tries again), but rare enough to show.
		t.Logf("the fence's first pause failed; its log:\n%s", r.fenceLog.Tail(8<<10))
	}
	if !r.prim.Paused() {
		stopped := "running"
		select {
		case <-r.prim.Done():
			res, err := r.prim.Wait()
			stopped = fmt.Sprintf("stopped: %+v, %v", res, err)
		default:
		}
		t.Fatalf("a fenced primary's vCPUs are stopped: not paused; the machine is %s; its Fence logged:\n%s", stopped, r.fenceLog.Tail(8<<10))
	}
	require.ErrorIs(t, r.disk.AllowWrite(), ErrDiskFenced)
	require.Contains(t, r.node.Describe(), "FENCED")
	require.Contains(t, r.node.Fencing(), "FENCED")
	require.Eventually(t, func() bool {
		rep := r.node.Replicator()
		select {
		case <-rep.Done():
			return true
		default:
			return false
		}
	}, 10*time.Second, time.Millisecond, "a fenced primary's replication ends")
	_, err := r.node.Protect(context.Background(), r.prim, ReplicateConfig{To: r.link.addr(), Insecure: true, Name: "tiny"})
	require.ErrorIs(t, err, ErrFencedNode)
	grows(t, r.sWire, 50, "the new primary goes on")
	n, _ := r.pWire.last()
	require.Equal(t, nP, n, "the fenced primary stays silent")
}

// A VMM whose guest had stopped before it was fenced (a fatal vCPU exit,
// or the guest powered off) is fenced at once: its machine cannot pause,
// and need not, as nothing runs; the Fence says so instead of trying to
// pause it again.
func TestFenceOfAStoppedMachine(t *testing.T) {
	kvmtest.Require(t)
	m := newTiny(t, tinyguest.Exit(7))
	require.NoError(t, m.Start())
	select {
	case <-m.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the tiny guest does not exit")
	}
	disk := NewDiskLog(nil, 0)
	log := fenceWith(t, FenceConfig{Machine: m, Disks: []*DiskLog{disk}})
	require.ErrorIs(t, disk.AllowWrite(), ErrDiskFenced)
	require.False(t, m.Paused(), "a stopped machine is not paused")
	require.Contains(t, log, "the machine had stopped already", "the Fence says the machine had stopped")
	require.NotContains(t, log, "trying again", "and tries no pause again")
}

// Only the link between primary and standby is cut; both reach the
// witness. The primary advances the generation and goes on, unprotected;
// the standby sees that the primary lives (or moved on) and does not take
// over. Exactly one wire carries frames; the primary is then protected
// again by the same standby, at the new generation.
func TestWitnessLinkCutPrimaryGoesOn(t *testing.T) {
	r := newFencedRig(t)
	grows(t, r.pWire, 50, "the protected primary's output leaves after acks")
	g := r.fence.Generation()

	r.link.partition(true)
	require.Eventually(t, func() bool { return r.fence.Generation() == g+1 && r.fence.CanRelease() }, 20*time.Second, time.Millisecond,
		"the primary advances past the standby's generation")
	grows(t, r.pWire, 50, "the primary goes on, unprotected")
	require.Eventually(t, func() bool { return r.sb.Status().Phase == PhaseListening }, 20*time.Second, time.Millisecond)
	st := r.sb.Status()
	require.Contains(t, st.Outcome, "not taking over")
	t.Logf("standby: %s", st.Outcome)
	select {
	case tk := <-r.done:
		t.Fatalf("the standby took over a live primary: %+v", tk)
	default:
	}
	n, _ := r.sWire.last()
	require.Zero(t, n, "the standby's wire stays silent")

	r.link.partition(false)
	r.link.kill()
	r.link = newProxy(t, r.sb.Addr())
	r.protect()
	require.Equal(t, g+1, r.sb.Status().Generation, "the new standby claims from the new generation")
	require.True(t, r.node.Replicator().Stats().Protected)
	require.Eventually(t, func() bool { return r.sb.Status().FailoverPossible }, 10*time.Second, time.Millisecond,
		"the standby could take over the new generation")
	grows(t, r.pWire, 50, "protected again, output leaves after acks")
}

// The standby is cut from the witness, then the primary dies: the standby
// does not take over and says why (its status), keeps its replica and
// keeps claiming; once the witness answers it takes over.
func TestWitnessStandbyCutOffDoesNotTakeOver(t *testing.T) {
	r := newFencedRig(t)
	grows(t, r.pWire, 20, "protected")
	r.toWitnessS.partition(true)
	require.Eventually(t, func() bool {
		st := r.sb.Status()
		return !st.FailoverPossible && !st.Reachable && st.Epoch > 0
	}, 10*time.Second, time.Millisecond, "the standby reports failover impossible while the witness does not answer")
	t.Logf("standby before the primary dies: %s", r.sb.Status().Reason)

	// The primary's host dies: guest stopped, links gone, no more renewals.
	require.NoError(t, r.prim.Pause())
	r.fence.Close()
	r.link.kill()
	require.Eventually(t, func() bool {
		st := r.sb.Status()
		return st.Phase == PhaseClaiming && st.Reason != "" && !st.FailoverPossible &&
			containsAll(st.Reason, "failover impossible", "claiming again")
	}, 20*time.Second, time.Millisecond)
	t.Logf("standby after the primary died: %s", r.sb.Status().Reason)
	select {
	case tk := <-r.done:
		t.Fatalf("the standby took over without the witness: %+v", tk)
	case <-time.After(3 * fencedFailover):
	}
	n, _ := r.sWire.last()
	require.Zero(t, n)

	r.toWitnessS.partition(false)
	select {
	case tk := <-r.done:
		require.NoError(t, tk.err)
		defer tk.m.Close()
		require.NotNil(t, tk.tk.Fence)
		t.Logf("took over at checkpoint %d once the witness answered (claim %v)", tk.tk.Epoch, tk.tk.Claim)
	case <-time.After(30 * time.Second):
		t.Fatal("the standby did not take over once the witness answered")
	}
	n, _ = r.sWire.last()
	require.Greater(t, n, 0, "the guest is announced from the standby")
}

// The witness goes down: replication goes on, the primary holds its
// output (nothing is lost: it leaves once the witness is back), the
// standby reports failover impossible; a restarted witness keeps the
// generation, and everything carries on.
func TestWitnessDownReplicationGoesOn(t *testing.T) {
	r := newFencedRig(t)
	grows(t, r.pWire, 20, "protected")
	g := r.fence.Generation()
	rep := r.node.Replicator()

	r.w.stop()
	require.Eventually(t, func() bool { return !r.fence.CanRelease() }, 10*time.Second, time.Millisecond)
	acked := rep.Stats().Acked
	held, _ := r.pWire.last()
	require.Eventually(t, func() bool { return rep.Stats().Acked > acked+20 }, 10*time.Second, time.Millisecond,
		"replication goes on without the witness")
	require.Eventually(t, func() bool { return !r.sb.Status().Reachable }, 10*time.Second, time.Millisecond)
	st := r.sb.Status()
	require.False(t, st.FailoverPossible)
	require.Contains(t, st.Reason, "failover impossible")
	n, _ := r.pWire.last()
	require.Equal(t, held, n, "no output leaves without a lease")
	require.Greater(t, rep.Stats().HeldFrames, 0, "it is held, not dropped")
	require.Contains(t, r.node.Fencing(), "EXPIRED")

	r.w.start()
	require.Eventually(t, func() bool { return r.fence.CanRelease() }, 20*time.Second, time.Millisecond, "renewed by the restarted witness")
	require.Equal(t, g, r.fence.Generation(), "the restarted witness kept the generation")
	var rec witness.Record
	for _, x := range r.w.srv.Records() {
		rec = x
	}
	require.Equal(t, g, rec.Generation)
	grows(t, r.pWire, 50, "the held output leaves, and more")
	require.Eventually(t, func() bool { return r.sb.Status().FailoverPossible }, 20*time.Second, time.Millisecond)
	require.True(t, rep.Stats().Protected)
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// A live migration with a witness hands the generation over with the
// guest: the source resigns its lease after the final ack, so that the
// destination wins the next generation at once (not a lease later), and
// the source never releases output again.
func TestWitnessMigrationHandsOverTheGeneration(t *testing.T) {
	kvmtest.Require(t)
	w := startWitnessRig(t)
	sOut := NewOutputBuffer(&timedSink{}, 0)
	dst, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, FailoverTimeout: fencedFailover,
		Witness: w.client(w.addr, "destination", 2*time.Second), Logger: quiet,
		Build: func(id stream.Identity) (Replica, error) {
			rep, err := buildTiny(id)
			rep.NICs = []NIC{{Out: sOut, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}}}
			return rep, err
		}})
	require.NoError(t, err)
	defer dst.Close()
	done := receive(t, dst)

	src := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	wire := &timedSink{}
	out := NewOutputBuffer(wire, 0)
	fence := NewFence(FenceConfig{Lease: acquire(t, w.client(w.addr, "source", 2*time.Second)), Witness: w.addr,
		Machine: src, Outputs: []*OutputBuffer{out}, Logger: quiet})
	defer fence.Close()
	require.NoError(t, src.Start())
	node := NewNode(Booted, Takeover{}, fence)
	_, err = node.Migrate(context.Background(), src, MigrateConfig{To: dst.Addr(), Insecure: true, Name: "tiny"}, false)
	require.NoError(t, err)
	r := <-done
	require.NoError(t, r.err)
	defer r.m.Close()
	require.NotNil(t, r.tk.Fence)
	defer r.tk.Fence.Close()
	require.Equal(t, uint64(2), r.tk.Fence.Generation())
	require.Less(t, r.tk.Claim, time.Second, "the source resigned: no lease (2s) to wait out")
	require.False(t, fence.CanRelease(), "the source never releases output again")
	require.NoError(t, out.Send([]byte("late")))
	n, _ := wire.last()
	require.Zero(t, n)
	require.True(t, r.tk.Fence.CanRelease())
	t.Logf("migrated; the destination won generation 2 in %v", r.tk.Claim)
}

// A forced migration of a replicated primary (dropProtection): the
// replication stops, the standby left behind discards its replica, the
// source advances the generation past it before the destination's hello
// (Fence.settle), and the destination wins the generation after that: it
// runs the guest and its output leaves; the source's never again, and the
// old standby's never.
func TestWitnessForcedMigrationOfReplicatedPrimary(t *testing.T) {
	r := newFencedRig(t)
	grows(t, r.pWire, 50, "the protected primary's output leaves after acks")
	g := r.fence.Generation()

	_, err := r.node.Migrate(context.Background(), r.prim, MigrateConfig{To: "127.0.0.1:1", Insecure: true, Name: "tiny"}, false)
	require.ErrorIs(t, err, ErrWouldUnprotect)

	dOut := &timedSink{}
	dBuf := NewOutputBuffer(dOut, 0)
	dst, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, FailoverTimeout: fencedFailover,
		Witness: r.w.client(r.w.addr, "destination", testLease), Logger: quiet,
		Build: func(id stream.Identity) (Replica, error) {
			rep, err := buildTiny(id)
			rep.NICs = []NIC{{Out: dBuf, MAC: net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2}}}
			return rep, err
		}})
	require.NoError(t, err)
	defer dst.Close()
	done := receive(t, dst)

	res, err := r.node.Migrate(context.Background(), r.prim, MigrateConfig{To: dst.Addr(), Insecure: true, Name: "tiny"}, true)
	require.NoError(t, err)
	require.Equal(t, r.link.addr(), res.DroppedProtection)
	d := <-done
	require.NoError(t, d.err)
	defer d.m.Close()
	require.NotNil(t, d.tk.Fence)
	defer d.tk.Fence.Close()
	require.Equal(t, g+2, d.tk.Fence.Generation(), "advanced past the standby left behind, then won by the destination")
	require.False(t, r.fence.CanRelease(), "the source never releases output again")
	r.guestSends(dBuf)
	grows(t, dOut, 20, "the migrated guest's output leaves at the destination")
	n, _ := r.sWire.last()
	require.Zero(t, n, "the old standby never ran the guest")
}
