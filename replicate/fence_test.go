package replicate

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/guestrig"
	"govmm/replicate/witness"
)

// These tests run the Fence against a real witness (witness.Server) on
// loopback, reached through a proxy the test can partition, with short
// leases in real time: every wait is for a condition.

var witnessKey = []byte("0123456789abcdef0123456789abcdef")

// witnessRig is a witness on a fixed loopback address, so that a
// restarted one is found where the old one was.
type witnessRig struct {
	t    *testing.T
	dir  string
	addr string
	srv  *witness.Server
	done chan struct{}
}

func startWitnessRig(t *testing.T) *witnessRig {
	t.Helper()
	w := &witnessRig{t: t, dir: t.TempDir()}
	w.start()
	t.Cleanup(w.stop)
	return w
}

func (w *witnessRig) start() {
	w.t.Helper()
	addr := w.addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	require.NoError(w.t, err)
	w.addr = ln.Addr().String()
	w.srv, err = witness.NewServer(witness.ServerConfig{Key: witnessKey, StateDir: w.dir,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(w.t, err)
	w.done = make(chan struct{})
	go func(srv *witness.Server, done chan struct{}) {
		defer close(done)
		_ = srv.Serve(ln)
	}(w.srv, w.done)
}

// stop stops the witness (idempotent); start starts it again on the same
// address and state.
func (w *witnessRig) stop() {
	if w.srv == nil {
		return
	}
	w.srv.Close()
	<-w.done
	w.srv = nil
}

// client is a witness client for vm "tiny" at addr.
func (w *witnessRig) client(addr, holder string, lease time.Duration) *witness.Client {
	w.t.Helper()
	c, err := witness.NewClient(witness.Config{Addr: addr, Key: witnessKey, VM: "tiny", Holder: holder, Lease: lease,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	require.NoError(w.t, err)
	w.t.Cleanup(func() { c.Close() })
	return c
}

func (p *proxy) partition(on bool) {
	p.stallFwd.Store(on)
	p.stallBack.Store(on)
}

// timedSink records when each frame left.
type timedSink struct {
	sink
	tmu sync.Mutex
	at  []time.Time
}

func (s *timedSink) Send(f []byte) error {
	s.tmu.Lock()
	s.at = append(s.at, time.Now())
	s.tmu.Unlock()
	return s.sink.Send(f)
}

// first is when the first frame left (zero if none did).
func (s *timedSink) first() time.Time {
	s.tmu.Lock()
	defer s.tmu.Unlock()
	if len(s.at) == 0 {
		return time.Time{}
	}
	return s.at[0]
}

func (s *timedSink) last() (int, time.Time) {
	s.tmu.Lock()
	defer s.tmu.Unlock()
	if len(s.at) == 0 {
		return 0, time.Time{}
	}
	return len(s.at), s.at[len(s.at)-1]
}

const testLease = 300 * time.Millisecond

func acquire(t *testing.T, c *witness.Client) *witness.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := c.Acquire(ctx)
	require.NoError(t, err)
	return l
}

// Output leaves only under a valid lease: cut from the witness, the
// primary drops what it would pass through and holds what its standby
// acknowledged (nothing is lost: it leaves, in order, once the witness
// answers again), and ctl info and the metrics say so.
func TestFenceGatesOutputOnTheLease(t *testing.T) {
	w := startWitnessRig(t)
	px := newProxy(t, w.addr)
	lease := acquire(t, w.client(px.addr(), "primary", testLease))
	pass, held := &sink{}, &sink{}
	out, armedOut := NewOutputBuffer(pass, 0), armed(held, 0, 0)
	f := NewFence(FenceConfig{Lease: lease, Witness: w.addr, Outputs: []*OutputBuffer{out, armedOut}})
	defer f.Close()
	require.True(t, f.CanRelease())
	require.NoError(t, out.Send([]byte("a")))
	require.NoError(t, armedOut.Send([]byte("a")))
	require.NoError(t, armedOut.Seal(1))
	require.NoError(t, armedOut.Release(1))
	require.Equal(t, []string{"a"}, pass.got())
	require.Equal(t, []string{"a"}, held.got())
	require.Contains(t, f.Describe(), "lease valid")

	px.partition(true)
	require.Eventually(t, func() bool { return !f.CanRelease() }, 5*time.Second, time.Millisecond,
		"the lease runs out by the holder's clock while the witness does not answer")
	require.NoError(t, out.Send([]byte("b")))
	require.NoError(t, armedOut.Send([]byte("c")))
	require.NoError(t, armedOut.Seal(2))
	require.ErrorIs(t, armedOut.Release(2), ErrNoLease)
	require.Equal(t, []string{"a"}, pass.got(), "nothing passes through without a lease")
	require.Equal(t, []string{"a"}, held.got(), "nothing acknowledged leaves without a lease")
	require.Contains(t, f.Describe(), "lease EXPIRED: output HELD")
	require.Equal(t, 0.0, metricValue(t, f.Metrics(), "govmm_witness_lease_valid"))
	require.Equal(t, 1.0, metricValue(t, f.Metrics(), "govmm_output_dropped_without_lease_total"))
	require.Equal(t, 1.0, metricValue(t, f.Metrics(), "govmm_output_held_without_lease_total"))

	px.partition(false)
	require.Eventually(t, func() bool { return f.CanRelease() }, 10*time.Second, time.Millisecond, "renewed once the witness answers")
	require.NoError(t, armedOut.Send([]byte("d")))
	require.NoError(t, armedOut.Seal(3))
	require.NoError(t, armedOut.Release(3))
	require.Equal(t, []string{"a", "c", "d"}, held.got(), "the held epoch leaves first, in order")
	require.NoError(t, out.Send([]byte("e")))
	require.Equal(t, []string{"a", "e"}, pass.got())
	require.Greater(t, metricValue(t, f.Metrics(), "govmm_witness_renewal_failures_total"), 0.0)
}

// A primary whose standby is gone advances the generation before its
// output runs ahead of the standby's replica: meanwhile (the witness does
// not answer) nothing leaves and a new replication cannot start; after
// it, the standby left behind can never claim the VM.
func TestFenceAdvancesBeforeOutputRunsAhead(t *testing.T) {
	w := startWitnessRig(t)
	px := newProxy(t, w.addr)
	lease := acquire(t, w.client(px.addr(), "primary", testLease))
	g := lease.Generation()
	s := &sink{}
	out := NewOutputBuffer(s, 0)
	f := NewFence(FenceConfig{Lease: lease, Witness: w.addr, Outputs: []*OutputBuffer{out}})
	defer f.Close()

	f.standbyGone()
	require.NoError(t, f.settle(ctxT(t, 10*time.Second)))
	require.Equal(t, g+1, f.Generation())
	require.NoError(t, out.Send([]byte("a")))
	require.Equal(t, []string{"a"}, s.got())
	_, err := w.client(w.addr, "old standby", testLease).Claim(ctxT(t, 10*time.Second), g)
	require.ErrorIs(t, err, witness.ErrSuperseded, "the standby left behind cannot claim")

	px.partition(true)
	f.standbyGone()
	require.False(t, f.CanRelease())
	require.NoError(t, out.Send([]byte("b")))
	require.ErrorContains(t, f.settle(ctxT(t, 3*testLease)), "not advanced yet")
	require.Contains(t, f.Describe(), "standby gone, advancing past generation")
	require.Equal(t, 1.0, metricValue(t, f.Metrics(), "govmm_witness_standby_behind"))
	px.partition(false)
	require.NoError(t, f.settle(ctxT(t, 10*time.Second)))
	require.Equal(t, g+2, f.Generation())
	require.NoError(t, out.Send([]byte("c")))
	require.Equal(t, []string{"a", "c"}, s.got(), "b never left: it was sent while the generation was behind")
}

// A primary cut off from the witness long enough for its standby to win
// the next generation is fenced as soon as it hears of it: it never sends
// another frame (its last one left before the standby won) and its disks
// refuse writes.
func TestFenceFencesTheVMM(t *testing.T) {
	w := startWitnessRig(t)
	px := newProxy(t, w.addr)
	lease := acquire(t, w.client(px.addr(), "primary", testLease))
	g := lease.Generation()
	s := &timedSink{}
	out := NewOutputBuffer(s, 0)
	disk := NewDiskLog(bytes.NewReader(nil), 0)
	f := NewFence(FenceConfig{Lease: lease, Witness: w.addr, Outputs: []*OutputBuffer{out}, Disks: []*DiskLog{disk}})
	defer f.Close()
	stop := make(chan struct{})
	defer close(stop)
	go func() { // the guest sends a frame every millisecond
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
				_ = out.Send([]byte{byte(i)})
			}
		}
	}()
	require.Eventually(t, func() bool { n, _ := s.last(); return n > 10 }, 5*time.Second, time.Millisecond)

	px.partition(true)
	l2, err := w.client(w.addr, "standby", testLease).Claim(ctxT(t, 10*time.Second), g)
	require.NoError(t, err, "the standby wins once the primary's lease ran out at the witness")
	won := time.Now()
	defer l2.Close()
	_, lastBefore := s.last()
	require.True(t, lastBefore.Before(won), "the primary's last frame left before the standby won")
	px.partition(false)
	select {
	case <-f.Fenced():
	case <-time.After(10 * time.Second):
		t.Fatal("the primary is not fenced after the witness answers again")
	}
	n, last := s.last()
	time.Sleep(3 * testLease) // the guest keeps sending meanwhile
	n2, _ := s.last()
	require.Equal(t, n, n2, "a fenced VMM sends nothing")
	require.True(t, last.Before(won), "no frame since the standby won")
	require.ErrorIs(t, disk.AllowWrite(), ErrDiskFenced)
	var fe *witness.FencedError
	require.ErrorAs(t, f.Err(), &fe)
	require.Equal(t, g+1, fe.Current)
	require.Contains(t, f.Describe(), "FENCED")
	require.Equal(t, 1.0, metricValue(t, f.Metrics(), "govmm_witness_fenced"))
	require.Greater(t, out.Stats().DroppedFenced, uint64(0))
}

// failingPauser is a machine whose first fails pauses fail (as a
// vCPU's KVM_RUN failing on its way out of the guest makes
// vmm.Machine.Pause fail while the guest runs on).
type failingPauser struct {
	fails int
	calls atomic.Int32
}

func (p *failingPauser) Pause() error {
	if int(p.calls.Add(1)) <= p.fails {
		return errors.New("vcpu 0: pause: KVM_RUN: bad address")
	}
	return nil
}

// fenceWith fences a VMM guarded as cfg says (its lease, witness and
// logger filled in here), through a real witness: the standby wins the
// next generation while the primary is cut off, then the primary hears
// of it. It returns the Fence's log once Fenced is closed.
func fenceWith(t *testing.T, cfg FenceConfig) string {
	t.Helper()
	w := startWitnessRig(t)
	px := newProxy(t, w.addr)
	lease := acquire(t, w.client(px.addr(), "primary", testLease))
	log := &guestrig.ConsoleLog{Name: "fence"}
	cfg.Lease, cfg.Witness, cfg.Logger = lease, w.addr, slog.New(slog.NewTextHandler(log, nil))
	f := NewFence(cfg)
	defer f.Close()
	px.partition(true)
	l2, err := w.client(w.addr, "standby", testLease).Claim(ctxT(t, 10*time.Second), lease.Generation())
	require.NoError(t, err)
	defer l2.Close()
	px.partition(false)
	select {
	case <-f.Fenced():
	case <-time.After(10 * time.Second):
		t.Fatalf("not fenced once the witness answers again; the Fence logged:\n%s", log.Tail(1<<20))
	}
	return log.Tail(1 << 20)
}

// A fence whose pause fails tries again until it holds, and says so.
func TestFencePausesAgainAfterAFailedPause(t *testing.T) {
	m := &failingPauser{fails: 2}
	log := fenceWith(t, FenceConfig{pauser: m})
	assert.Equal(t, int32(3), m.calls.Load(), "two failed pauses, then one that held")
	assert.Equal(t, 2, strings.Count(log, "trying again"), log)
	assert.Contains(t, log, "KVM_RUN: bad address", "each failure says why")
	assert.NotContains(t, log, "could not be paused", log)
}

// A pause that never holds is given up after fencePauseTries, with the
// output and disks fenced already: Fenced closes and the log says the
// guest runs on.
func TestFenceGivesUpAPauseThatNeverHolds(t *testing.T) {
	m := &failingPauser{fails: 1 << 30}
	start := time.Now()
	log := fenceWith(t, FenceConfig{pauser: m})
	assert.Equal(t, int32(fencePauseTries), m.calls.Load())
	assert.GreaterOrEqual(t, time.Since(start), (fencePauseTries-1)*fencePauseRetry, "tries spaced by fencePauseRetry")
	assert.Contains(t, log, "the vCPUs could not be paused; the guest runs on", log)
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func metricValue(t *testing.T, ms []Metric, name string) float64 {
	t.Helper()
	for _, m := range ms {
		if m.Name == name {
			return m.Value
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}
