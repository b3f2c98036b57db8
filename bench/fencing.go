package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"govmm/replicate"
	"govmm/replicate/witness"
	"govmm/vmm"
)

// FencingConfig parameterises the fencing suite: what the witness lease
// costs a primary (docs/FENCING.md).
type FencingConfig struct {
	Pages  int           // the Dirtier's working set (default 256)
	Epoch  time.Duration // default 25ms (replicate.DefaultEpoch)
	Warmup int           // epochs dropped at the start of each run (default 10)
	Epochs int           // epochs kept per run (default 200)
	Trials int           // runs per mode, modes interleaved (default 3)
	Lease  time.Duration // the witness lease (default witness.DefaultLease)
	Out    string
	Log    io.Writer
}

// Fencing modes: the same replication without a witness, with one, with
// one and a lease 20 times shorter (20 times the renewals), and with one
// that stops answering once the lease is granted (every renewal times
// out; the lease runs out and the output is held).
const (
	FenceNone        = "no witness"
	FenceLease       = "witness"
	FenceShortLease  = "witness, short lease"
	FenceUnreachable = "witness not answering"
)

var fencingModes = []string{FenceNone, FenceLease, FenceShortLease, FenceUnreachable}

// FencingSample is one epoch's pause in one mode.
type FencingSample struct {
	Mode  string
	Trial int
	Stats replicate.EpochStats
}

// FencingTraffic is the renewal traffic one run put on the wire.
type FencingTraffic struct {
	Mode      string
	Trial     int
	Lease     time.Duration
	Window    time.Duration
	Renewals  uint64 // answered
	Failures  uint64
	BytesUp   uint64 // primary → witness, TCP payload
	BytesDown uint64 // witness → primary
	Frames    uint64 // guest frames released (or, unreachable: held)
	Held      uint64 // releases the lease postponed
}

// FencingResult is everything the suite measured.
type FencingResult struct {
	Samples []FencingSample
	Traffic []FencingTraffic
	Config  FencingConfig
}

// Fencing replicates a tiny dirtying guest to an in-process standby over
// loopback, as the checkpoint suite does, in each mode in turn, with a
// NIC whose output buffer sends a frame every millisecond through the
// lease's gate; the primary reaches an in-process witness through a relay
// that counts the bytes. It keeps every epoch's pause (the pause path
// never asks the witness: the distributions should not differ) and the
// renewal traffic.
func Fencing(ctx context.Context, cfg FencingConfig) (*FencingResult, error) {
	if cfg.Pages <= 0 {
		cfg.Pages = 256
	}
	if cfg.Epoch <= 0 {
		cfg.Epoch = replicate.DefaultEpoch
	}
	if cfg.Warmup <= 0 {
		cfg.Warmup = 10
	}
	if cfg.Epochs <= 0 {
		cfg.Epochs = 200
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 3
	}
	if cfg.Lease <= 0 {
		cfg.Lease = witness.DefaultLease
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	dir, err := os.MkdirTemp("", "govmm-bench-fencing-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	key := []byte("govmm-bench-fencing-key-01234567")
	srv, err := witness.NewServer(witness.ServerConfig{Key: key, StateDir: filepath.Join(dir, "witness"), Logger: quietLogger()})
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() { _ = srv.Serve(ln) }()

	res := &FencingResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, mode := range fencingModes {
			ss, tr, err := fencingRun(ctx, cfg, key, ln.Addr().String(), mode, trial)
			if err != nil {
				return res, fmt.Errorf("fencing %s trial %d: %w", mode, trial, err)
			}
			res.Samples = append(res.Samples, ss...)
			res.Traffic = append(res.Traffic, tr)
			var pause []float64
			for _, s := range ss {
				pause = append(pause, usOf(s.Stats.Pause))
			}
			p := Summarize(pause)
			fmt.Fprintf(cfg.Log, "fencing: %-22s trial %d: %d epochs, pause median %.0f µs p99 %.0f µs; %d renewals (%d failed), %d B up, %d B down in %v\n",
				mode, trial, len(ss), p.Median, p.P99, tr.Renewals, tr.Failures, tr.BytesUp, tr.BytesDown, tr.Window.Round(time.Millisecond))
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

// fencingRun replicates one tiny guest with a NIC that sends a frame
// every millisecond, under mode's witness (or none), and keeps cfg.Epochs
// epochs after the warm-up, with the witness traffic of that window.
func fencingRun(ctx context.Context, cfg FencingConfig, key []byte, witnessAddr, mode string, trial int) ([]FencingSample, FencingTraffic, error) {
	tr := FencingTraffic{Mode: mode, Trial: trial}
	m, err := newTinyMachine(cfg.Pages, memFor(cfg.Pages))
	if err != nil {
		return nil, tr, err
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		return nil, tr, err
	}
	if err := waitPasses(ctx, m, 1, time.Minute); err != nil {
		return nil, tr, err
	}
	vm := strings.ReplaceAll(fmt.Sprintf("bench-%d-%s", trial, strings.ReplaceAll(mode, " ", "-")), ",", "")
	lease := cfg.leaseOf(mode)
	if mode != FenceNone {
		tr.Lease = lease
	}

	// The NIC: frames into a counting backend, one every millisecond.
	wire := &countingNIC{}
	out := replicate.NewOutputBuffer(wire, 0)
	var w fencingWitness
	if mode != FenceNone {
		if w, err = newFencingWitness(ctx, key, witnessAddr, vm, lease, m, out); err != nil {
			return nil, tr, err
		}
		defer w.close()
	}
	sb, err := startStandby(ctx, w.standby)
	if err != nil {
		return nil, tr, err
	}
	defer sb.stop()
	rep, err := replicate.StartReplication(ctx, m, replicate.ReplicateConfig{To: sb.addr, Insecure: true, Name: vm,
		Epoch: cfg.Epoch, FailoverTimeout: 10 * time.Second, Outputs: []*replicate.OutputBuffer{out}, Fence: w.fence, Logger: quietLogger()})
	if err != nil {
		return nil, tr, err
	}
	defer rep.Stop()
	stopNIC := sendEvery(out, time.Millisecond)
	defer stopNIC()
	if mode == FenceUnreachable {
		// Measured once the lease has run out: output held, renewals
		// timing out.
		w.relay.blackhole.Store(true)
		for w.fence.CanRelease() {
			select {
			case <-ctx.Done():
				return nil, tr, ctx.Err()
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	first := rep.Stats().Epochs + uint64(cfg.Warmup) // the first epoch kept
	before := w.traffic(wire)
	start := time.Now()
	want := first + uint64(cfg.Epochs)
	if err := waitEpochs(ctx, rep, want+1, time.Duration(want)*cfg.Epoch*8+2*time.Minute); err != nil {
		return nil, tr, err
	}
	tr.Window = time.Since(start)
	tr.countBetween(before, w.traffic(wire))
	stopNIC()
	var samples []FencingSample
	for _, es := range rep.Recent() {
		if len(samples) == cfg.Epochs {
			break
		}
		if es.Epoch > first {
			samples = append(samples, FencingSample{Mode: mode, Trial: trial, Stats: es})
		}
	}
	return samples, tr, nil
}

// leaseOf is the lease a trial of mode asks the witness for.
func (cfg FencingConfig) leaseOf(mode string) time.Duration {
	if mode == FenceShortLease {
		return cfg.Lease / 20
	}
	return cfg.Lease
}

// countBetween sets tr's counts to the traffic between two readings (the frames
// held are the last reading's).
func (tr *FencingTraffic) countBetween(before, after FencingTraffic) {
	tr.BytesUp, tr.BytesDown = after.BytesUp-before.BytesUp, after.BytesDown-before.BytesDown
	tr.Renewals, tr.Failures = after.Renewals-before.Renewals, after.Failures-before.Failures
	tr.Held, tr.Frames = after.Held, after.Frames-before.Frames
}

// fencingWitness is what a trial with a witness adds: the primary's lease
// acquired through a relay that counts its bytes (and can stop answering),
// the Fence on the NIC's output, and the standby's witness client. The
// zero value stands for no witness.
type fencingWitness struct {
	relay   *countingRelay
	client  *witness.Client
	fence   *replicate.Fence
	standby *witness.Client
}

func newFencingWitness(ctx context.Context, key []byte, addr, vm string, lease time.Duration, m *vmm.Machine,
	out *replicate.OutputBuffer) (w fencingWitness, err error) {
	defer func() {
		if err != nil {
			w.close()
		}
	}()
	if w.relay, err = newCountingRelay(addr); err != nil {
		return w, err
	}
	w.client, err = witness.NewClient(witness.Config{Addr: w.relay.addr(), Key: key, VM: vm, Holder: "bench primary", Lease: lease, Logger: quietLogger()})
	if err != nil {
		return w, err
	}
	actx, cancel := context.WithTimeout(ctx, 30*time.Second)
	l, err := w.client.Acquire(actx)
	cancel()
	if err != nil {
		return w, err
	}
	w.fence = replicate.NewFence(replicate.FenceConfig{Lease: l, Witness: addr, Machine: m,
		Outputs: []*replicate.OutputBuffer{out}, Logger: quietLogger()})
	w.standby, err = witness.NewClient(witness.Config{Addr: addr, Key: key, VM: vm, Holder: "bench standby", Lease: lease, Logger: quietLogger()})
	return w, err
}

func (w fencingWitness) close() {
	if w.standby != nil {
		w.standby.Close()
	}
	if w.fence != nil {
		w.fence.Close()
	}
	if w.client != nil {
		w.client.Close()
	}
	if w.relay != nil {
		w.relay.close()
	}
}

// traffic reads the counters a trial's window is the difference of.
func (w fencingWitness) traffic(wire *countingNIC) FencingTraffic {
	tr := FencingTraffic{Frames: wire.frames.Load()}
	if w.relay != nil {
		tr.BytesUp, tr.BytesDown = w.relay.up.Load(), w.relay.down.Load()
	}
	if w.fence != nil {
		st := w.fence.Status()
		tr.Renewals, tr.Failures, tr.Held = st.Lease.Renewals, st.Lease.TotalFails, st.Output.HeldNoLease
	}
	return tr
}

// sendEvery sends a frame into out every d until the returned function
// (idempotent) is called.
func sendEvery(out *replicate.OutputBuffer, d time.Duration) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		frame := make([]byte, 256)
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				_ = out.Send(frame)
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(quit); <-done }) }
}

// waitEpochs waits until rep has taken n epochs, or fails after timeout.
func waitEpochs(ctx context.Context, rep *replicate.Replicator, n uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for rep.Stats().Epochs < n {
		select {
		case <-rep.Done():
			return fmt.Errorf("replication ended: %w", rep.Err())
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d epochs before the deadline", rep.Stats().Epochs)
		}
	}
	return nil
}

// countingNIC is a network backend that counts and discards frames.
type countingNIC struct{ frames atomic.Uint64 }

func (n *countingNIC) VnetHdr() bool                 { return false }
func (n *countingNIC) SetReceiver(func([]byte) bool) {}
func (n *countingNIC) Start() error                  { return nil }
func (n *countingNIC) Close() error                  { return nil }
func (n *countingNIC) Send([]byte) error             { n.frames.Add(1); return nil }

// countingRelay forwards TCP connections to a target and counts the
// payload bytes each way; blackholed, it forwards nothing (a partition).
type countingRelay struct {
	ln        net.Listener
	target    string
	up, down  atomic.Uint64
	blackhole atomic.Bool
	mu        sync.Mutex
	conns     []net.Conn
}

func newCountingRelay(target string) (*countingRelay, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &countingRelay{ln: ln, target: target}
	go r.serve()
	return r, nil
}

func (r *countingRelay) addr() string { return r.ln.Addr().String() }

func (r *countingRelay) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, c, u)
		r.mu.Unlock()
		go r.pipe(c, u, &r.up)
		go r.pipe(u, c, &r.down)
	}
}

func (r *countingRelay) pipe(from, to net.Conn, n *atomic.Uint64) {
	buf := make([]byte, 16<<10)
	for {
		k, err := from.Read(buf)
		if k > 0 && !r.blackhole.Load() {
			n.Add(uint64(k))
			if _, werr := to.Write(buf[:k]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *countingRelay) close() {
	r.ln.Close()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
}

func (r *FencingResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		e := s.Stats
		rows = append(rows, []string{s.Mode, strconv.Itoa(s.Trial), strconv.FormatUint(e.Epoch, 10), ftoa(usOf(e.Pause), 1),
			strconv.Itoa(e.DirtyPages), ftoa(usOf(e.AckTime), 1)})
	}
	if err := writeCSV(filepath.Join(dir, "fencing.csv"), []string{"mode", "trial", "epoch", "pause_us", "dirty_pages", "ack_us"}, rows); err != nil {
		return err
	}
	rows = nil
	for _, t := range r.Traffic {
		rows = append(rows, []string{t.Mode, strconv.Itoa(t.Trial), ftoa(msOf(t.Lease), 0), ftoa(msOf(t.Window), 0),
			strconv.FormatUint(t.Renewals, 10), strconv.FormatUint(t.Failures, 10), strconv.FormatUint(t.BytesUp, 10),
			strconv.FormatUint(t.BytesDown, 10), strconv.FormatUint(t.Frames, 10), strconv.FormatUint(t.Held, 10)})
	}
	if err := writeCSV(filepath.Join(dir, "fencing_traffic.csv"), []string{"mode", "trial", "lease_ms", "window_ms", "renewals",
		"failures", "bytes_up", "bytes_down", "frames_released", "releases_held"}, rows); err != nil {
		return err
	}
	var names []string
	var values [][]float64
	for _, mode := range fencingModes {
		var v []float64
		for _, s := range r.Samples {
			if s.Mode == mode {
				v = append(v, usOf(s.Stats.Pause))
			}
		}
		names = append(names, mode)
		values = append(values, v)
	}
	return boxes(filepath.Join(dir, "fencing.png"), "Checkpoint pause with and without a witness", "pause (µs)", false, names, values)
}

// Report renders the fencing section of report.md.
func (r *FencingResult) Report() string {
	c := r.Config
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nWhat the witness lease (docs/FENCING.md) costs a primary. Guest: `tinyguest.Dirtier` over %d pages, replicated every %v to an in-process standby over loopback, "+
		"with a NIC whose output buffer gets a 256-byte frame every millisecond (each one asks the lease's gate before it leaves). "+
		"Modes, interleaved, %d runs each of %d kept epochs (after %d): *%s*; *%s* (lease %v, renewed every quarter lease); *%s* (lease %v); "+
		"*%s* (the witness's relay drops everything once the lease is granted: every renewal times out, the lease runs out and output is held). "+
		"The primary reaches the witness through a relay that counts TCP payload bytes. The pause path never asks the witness (the gate is asked on the release and send paths, "+
		"outside the pause), so the pause distributions should match, also when the witness does not answer. Raw data `fencing.csv`, `fencing_traffic.csv`, plot `fencing.png`.\n\n",
		platform(), c.Pages, c.Epoch, c.Trials, c.Epochs, c.Warmup, FenceNone, FenceLease, c.Lease, FenceShortLease, c.Lease/20, FenceUnreachable)
	b.WriteString("| mode | epochs | pause median µs | p25 | p75 | p99 | max | ack median µs |\n|---|---|---|---|---|---|---|---|\n")
	for _, mode := range fencingModes {
		var pause, ack []float64
		for _, s := range r.Samples {
			if s.Mode == mode {
				pause = append(pause, usOf(s.Stats.Pause))
				ack = append(ack, usOf(s.Stats.AckTime))
			}
		}
		p := Summarize(pause)
		fmt.Fprintf(&b, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |\n", mode, p.N, p.Median, p.P25, p.P75, p.P99, p.Max, Summarize(ack).Median)
	}
	b.WriteString("\n| mode | lease | renewals/s | failed | B/s to the witness | B/s back | B per renewal (both ways) | frames released/s | releases held |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, mode := range fencingModes {
		var win time.Duration
		var t FencingTraffic
		for _, x := range r.Traffic {
			if x.Mode == mode {
				win += x.Window
				t.Lease = x.Lease
				t.Renewals += x.Renewals
				t.Failures += x.Failures
				t.BytesUp += x.BytesUp
				t.BytesDown += x.BytesDown
				t.Frames += x.Frames
				t.Held += x.Held
			}
		}
		sec := win.Seconds()
		if sec == 0 {
			continue
		}
		per := "-"
		if t.Renewals > 0 {
			per = fmt.Sprintf("%.0f", float64(t.BytesUp+t.BytesDown)/float64(t.Renewals))
		}
		lease := "-"
		if t.Lease > 0 {
			lease = t.Lease.String()
		}
		fmt.Fprintf(&b, "| %s | %s | %.2f | %d | %.0f | %.0f | %s | %.0f | %d |\n", mode, lease, float64(t.Renewals)/sec, t.Failures,
			float64(t.BytesUp)/sec, float64(t.BytesDown)/sec, per, float64(t.Frames)/sec, t.Held)
	}
	return b.String()
}
