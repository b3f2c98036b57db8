package replicate

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// receive runs a standby's ReceiveReplication in the background.
func receive(t *testing.T, sb *Standby) <-chan takeover {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done, finished := make(chan takeover, 1), make(chan struct{})
	go func() {
		defer close(finished)
		m, tk, err := sb.ReceiveReplication(ctx)
		done <- takeover{m, tk, err}
	}()
	t.Cleanup(func() {
		cancel()
		<-finished
		select {
		case r := <-done: // not taken by the test
			if r.m != nil {
				r.m.Close()
			}
		default:
		}
	})
	return done
}

// A standby slower than the failover timeout (each commit takes three
// timeouts, as a slow disk sync would) is not dead: it does not take over
// its live primary, the primary does not give up on it but stretches its
// epochs (backpressure, in the metrics), and the guest stays protected.
// A real death is still detected close to the timeout.
func TestSlowStandbyIsNotDead(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	// Not much shorter: primary, standby and the guest's vCPU share this
	// host's cores here, and a starved sender is silent for real.
	const timeout = time.Second
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, Build: buildTiny, FailoverTimeout: timeout})
	require.NoError(t, err)
	t.Cleanup(func() { sb.Close() })
	var slow atomic.Int32
	slow.Store(2)
	sb.onCheckpoint = func(uint64) {
		if slow.Add(-1) >= 0 {
			time.Sleep(3 * timeout) // the scenario: a standby busy committing for longer than the failover timeout
		}
	}
	done := receive(t, sb)
	px := newProxy(t, sb.Addr())
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: timeout})
	require.NoError(t, err)
	t.Cleanup(rep.Stop)
	require.Eventually(t, func() bool { return slow.Load() < 0 && rep.Stats().Acked > 20 }, 30*time.Second, time.Millisecond)
	select {
	case r := <-done:
		t.Fatalf("the standby took over a live primary: %+v", r)
	case <-rep.Done():
		t.Fatalf("the primary gave up on a slow standby: %v", rep.Err())
	default:
	}
	st := rep.Stats()
	assert.True(t, st.Protected)
	assert.Positive(t, st.Backpressured)
	assert.GreaterOrEqual(t, st.BackpressureSum, 2*timeout, "epochs stretched while the standby was busy")
	t.Logf("backpressure: %d epochs, %v", st.Backpressured, st.BackpressureSum)

	// A real death (the primary's host freezes: silence, no reset).
	require.NoError(t, prim.Pause())
	px.stallFwd.Store(true)
	px.stallBack.Store(true)
	start := time.Now()
	r := <-done
	require.NoError(t, r.err)
	r.m.Close()
	r.m = nil
	took := time.Since(start)
	t.Logf("silent primary detected after %v (timeout %v)", took, timeout)
	require.ErrorIs(t, r.tk.Cause, stream.ErrTimeout)
	// Close to the timeout, with room for a loaded host's scheduling: a
	// detection that waited on TCP (minutes) or a second timeout fails.
	assert.Less(t, took, 2*timeout, "detection stays close to the timeout")
}

// During a partition (the link holds every byte, nothing is reset),
// Stop returns at once: it does not wait for the checkpoint stuck in a
// write, and no held frame is released.
func TestStopDuringPartitionDoesNotHang(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 512, passGPA))
	require.NoError(t, prim.Start())
	wire := &sink{}
	out := NewOutputBuffer(wire, 0)
	sb := newStandby(t, nil)
	receive(t, sb)
	px := newProxy(t, sb.Addr())
	// No backpressure limit: the epoch loop goes on until it blocks in a
	// write, the socket buffers full.
	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, FailoverTimeout: 30 * time.Second, MaxUnacked: 1 << 20, Outputs: []*OutputBuffer{out}})
	require.NoError(t, err)
	px.stallFwd.Store(true)
	px.stallBack.Store(true)
	require.NoError(t, out.Send([]byte("unacked")))
	last, same := rep.Stats().Bytes, 0
	require.Eventually(t, func() bool {
		b := rep.Stats().Bytes
		if b == last {
			same++
		} else {
			last, same = b, 0
		}
		return same >= 3
	}, 30*time.Second, 100*time.Millisecond, "the epoch loop blocks in a write")
	stopped := make(chan struct{})
	start := time.Now()
	go func() { rep.Stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop hangs during a partition")
	}
	t.Logf("Stop took %v", time.Since(start))
	assert.Empty(t, wire.got(), "unacknowledged output is dropped")
	require.NoError(t, out.Send([]byte("after")))
	assert.Equal(t, []string{"after"}, wire.got())
	assert.False(t, prim.Paused())
}

// A replication that fails to start (here: the standby never acknowledges
// the first checkpoint) leaves nothing armed: the guest's output flows.
func TestFailedStartLeavesOutputFlowing(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	wire := &sink{}
	out := NewOutputBuffer(wire, 0)
	sb := newStandby(t, nil)
	block := make(chan struct{})
	sb.onCheckpoint = func(uint64) { <-block }
	receive(t, sb)
	t.Cleanup(func() { close(block) }) // runs before receive's

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, err := StartReplication(ctx, prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Epoch: 10 * time.Millisecond, Outputs: []*OutputBuffer{out}})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.NoError(t, out.Send([]byte("x")))
	assert.Equal(t, []string{"x"}, wire.got(), "not held: nothing would ever release it")
}

// A standby refuses, at the handshake, a primary whose guest it could not
// run (here a device attribute differs: its MAC): the primary's
// StartReplication says why, the standby reports it, and keeps listening
// for a primary it can serve. Connections that are no primary at all do
// not end its wait either.
func TestStandbyRefusesAndKeepsListening(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	refused := make(chan error, 16)
	mac := func(v string) map[string][]stream.Attr {
		return map[string][]stream.Attr{"uart-com1": {{Key: "mac", Value: v}}}
	}
	sb, err := NewStandby(StandbyConfig{Listen: "127.0.0.1:0", Insecure: true, FailoverTimeout: 10 * time.Second,
		OnRefused: func(err error) { refused <- err },
		Build: func(id stream.Identity) (Replica, error) {
			rep, err := buildTiny(id)
			rep.Devices = mac("52:54:00:00:00:02")
			return rep, err
		}})
	require.NoError(t, err)
	t.Cleanup(func() { sb.Close() })
	done := receive(t, sb)

	for _, poke := range []func(){
		func() { c, _ := net.Dial("tcp", sb.Addr()); c.Close() },
		func() {
			c, _ := net.Dial("tcp", sb.Addr())
			_, _ = c.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
			c.Close()
		},
	} {
		poke()
		t.Logf("refused: %v", <-refused)
	}
	silent, err := net.Dial("tcp", sb.Addr())
	require.NoError(t, err)
	defer silent.Close()

	_, err = StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Devices: mac("52:54:00:00:00:01")})
	require.ErrorIs(t, err, stream.ErrMismatch)
	require.ErrorContains(t, err, `device uart-com1: mac`)
	t.Logf("primary: %v", err)
	require.ErrorIs(t, <-refused, stream.ErrMismatch)

	rep, err := StartReplication(context.Background(), prim, ReplicateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		Devices: mac("52:54:00:00:00:02"), FailoverTimeout: 10 * time.Second})
	require.NoError(t, err, "the standby still listens, and serves a primary it can run")
	assert.True(t, rep.Stats().Protected)
	select {
	case r := <-done:
		t.Fatalf("the standby stopped waiting: %v", r.err)
	default:
	}
	rep.Stop()
	require.ErrorContains(t, (<-done).err, "stopped replication")
}

// A migration whose final ack comes too late: the source gives up, tells
// the destination to discard the migration, and runs on; the destination,
// which did commit (and acknowledge) the final checkpoint, never runs the
// guest. The guest runs at exactly one end.
func TestMigrateLateAckNeverRunsTwice(t *testing.T) {
	kvmtest.Require(t)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, src.Start())
	sb := newStandby(t, nil)
	committed, gaveUp := make(chan struct{}), make(chan struct{})
	sb.onCheckpoint = func(uint64) { // the final checkpoint: committed only once the source gave up
		<-gaveUp
		close(committed)
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
	// AckTimeout: ample for the pre-copy rounds' acks under -race on a
	// loaded host.
	_, err := Migrate(context.Background(), src, MigrateConfig{To: sb.Addr(), Insecure: true, Name: "tiny",
		AckTimeout: 2 * time.Second})
	close(gaveUp)
	require.ErrorContains(t, err, "final checkpoint not acknowledged")
	require.ErrorContains(t, err, "keeps running here")
	<-committed
	r := <-done
	if r.m != nil {
		r.m.Close()
		t.Fatal("the destination runs the guest too")
	}
	// The destination hears the source's goodbye, or, if it got to send
	// its ack first, finds the connection closed: either way it does not
	// run the guest.
	require.Error(t, r.err)
	if !strings.Contains(r.err.Error(), "without handing over") {
		require.ErrorContains(t, r.err, "migration stream", "a stream that broke before the hand-over, not any other failure")
	}
	require.False(t, src.Paused())
	before := passes(t, src)
	require.Eventually(t, func() bool { return passes(t, src) > before }, 30*time.Second, time.Millisecond)
}

// The same with the ack held back by the network instead of a slow
// destination: it arrives after the source gave up.
func TestMigrateAckHeldBackNeverRunsTwice(t *testing.T) {
	kvmtest.Require(t)
	src := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, src.Start())
	sb := newStandby(t, nil)
	type received struct {
		m   *vmm.Machine
		err error
	}
	done := make(chan received, 1)
	go func() {
		m, _, err := sb.ReceiveMigration(context.Background())
		done <- received{m, err}
	}()
	px := newProxy(t, sb.Addr())
	var final atomic.Bool
	// The acks of the final round are held until the source has given up
	// (AckTimeout, ample for the pre-copy rounds' acks under -race on a
	// loaded host), and arrive after.
	_, err := Migrate(context.Background(), src, MigrateConfig{To: px.addr(), Insecure: true, Name: "tiny",
		AckTimeout: 2 * time.Second, Progress: func(p Progress) {
			if p.Phase == "stop-and-copy" && final.CompareAndSwap(false, true) {
				px.stallBack.Store(true)
			}
		}})
	px.stallBack.Store(false)
	require.ErrorContains(t, err, "keeps running here")
	r := <-done
	if r.m != nil {
		r.m.Close()
		t.Fatal("the destination runs the guest too")
	}
	require.ErrorContains(t, r.err, "without handing over")
	require.False(t, src.Paused())
}

// Migrating a VM that is being replicated is refused unless protection
// may be dropped: the migration's dirty tracking and the replication's
// would steal each other's pages, and the destination has no standby.
func TestMigrateRefusedWhileReplicating(t *testing.T) {
	kvmtest.Require(t)
	prim := newTiny(t, tinyguest.Dirtier(dirtyBase, 64, passGPA))
	require.NoError(t, prim.Start())
	node := NewNode(Booted, Takeover{}, nil)
	_, err := node.Protect(context.Background(), prim, ReplicateConfig{Transport: NewNullTransport(), Name: "tiny"})
	require.NoError(t, err)
	defer node.Unprotect()
	_, err = node.Migrate(context.Background(), prim, MigrateConfig{To: "127.0.0.1:1", Insecure: true, Name: "tiny"}, false)
	require.ErrorIs(t, err, ErrReplicating)
	require.ErrorIs(t, err, ErrWouldUnprotect)
	// Not left paused: replication's own checkpoints pause it now and
	// then (in the lab a large share of the time), so look until one
	// sample falls between two of them.
	require.Eventually(t, func() bool { return !prim.Paused() }, 10*time.Second, time.Millisecond, "the refused migration left the guest paused")
	require.Equal(t, RolePrimary, node.Role(), "still replicating")

	// Dropping protection: replication stops before the migration is
	// tried; here it fails (nobody listens), and the guest runs on,
	// unprotected, and the error says so.
	_, err = node.Migrate(context.Background(), prim, MigrateConfig{To: "127.0.0.1:1", Insecure: true, Name: "tiny"}, true)
	require.Error(t, err)
	require.ErrorContains(t, err, "the guest runs here UNPROTECTED")
	require.Equal(t, RoleAlone, node.Role())
	require.False(t, prim.Paused())
}
