package witness

import (
	"container/heap"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The simulation drives the witness's state machine (table, with its
// state file through encodeState/decodeState) and the holders' lease
// state (leaseCore, judge) through many random interleavings, every
// message through the wire codecs, under a simulated real time:
//
//   - each party's lease clock runs at its own rate within MaxDrift of
//     real time, from its own origin; the witness's too, new at each
//     restart;
//   - messages are delayed (sometimes by more than a lease), dropped, or
//     cut by partitions of a party's link;
//   - parties are stopped (SIGSTOP) for up to three leases and handle
//     what arrived meanwhile when they continue;
//   - the witness crashes and restarts from its state file; its saves
//     fail now and then, or become uncertain (it then stops, as the
//     server does, and restarts from whichever state the disk kept);
//   - holders renew, advance and resign; standbys learn the primary's
//     generation (as the replication stream tells them) and claim the
//     next one; fresh primaries acquire.
//
// At every event, and at random instants between, it checks the
// invariant: no party may release output while another party has been
// granted a newer generation; hence never two at once. A stopped party is
// checked too: it could continue at any instant.

type simConfig struct {
	lease    time.Duration
	duration time.Duration
	drift    float64 // clock rates within 1±drift
	// Broken variants, to show that the check catches what it should.
	fromReply bool // count the validity from the reply's arrival, not the send
	fullLease bool // validity = the whole lease: no drift allowance, no margin
	noGrace   bool // a restarted witness forgets the leases it granted
}

type simGrant struct {
	at     time.Duration
	gen    uint64
	holder string
}

type simEvent struct {
	at  time.Duration
	seq uint64
	fn  func()
}

type simQueue []*simEvent

func (q simQueue) Len() int { return len(q) }
func (q simQueue) Less(i, j int) bool {
	if q[i].at != q[j].at {
		return q[i].at < q[j].at
	}
	return q[i].seq < q[j].seq
}
func (q simQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *simQueue) Push(x any)   { *q = append(*q, x.(*simEvent)) }
func (q *simQueue) Pop() any     { o := *q; e := o[len(o)-1]; *q = o[:len(o)-1]; return e }

type simClock struct {
	rate float64
	off  time.Duration
}

func (c simClock) at(real time.Duration) time.Duration {
	return c.off + time.Duration(float64(real)*c.rate)
}
func (c simClock) real(local time.Duration) time.Duration {
	return time.Duration(float64(local) / c.rate)
}

type simPending struct {
	sentAt time.Duration // the party's clock when sent
	q      request
	gen    uint64 // the party's generation when sent
}

type simParty struct {
	name, holder string
	clk          simClock
	standby      bool
	base         uint64 // standby: the generation its replica descends from
	core         *leaseCore
	margin       time.Duration
	dead         bool // resigned or fenced: does nothing more
	linkUp       bool
	stoppedUntil time.Duration
	inbox        []func()
	actToken     uint64 // only the latest scheduled act runs
	nextID       uint64
	pending      map[uint64]simPending
}

type simWitness struct {
	up    bool
	clk   simClock
	tab   *table
	disk  []byte // the state file
	saves int
}

type simStats struct {
	grants, claims, advances, resigns, fences, restarts, uncertain, checks, releasing int
}

func (s *simStats) add(o simStats) {
	s.grants += o.grants
	s.claims += o.claims
	s.advances += o.advances
	s.resigns += o.resigns
	s.fences += o.fences
	s.restarts += o.restarts
	s.uncertain += o.uncertain
	s.checks += o.checks
	s.releasing += o.releasing
}

type sim struct {
	cfg     simConfig
	rng     *rand.Rand
	now     time.Duration
	seq     uint64
	q       simQueue
	w       simWitness
	parties []*simParty
	grants  []simGrant
	names   int
	trace   []string
	stats   simStats
	bad     string // the first violation
}

func (s *sim) logf(format string, args ...any) {
	line := fmt.Sprintf("%9.3fs ", s.now.Seconds()) + fmt.Sprintf(format, args...)
	s.trace = append(s.trace, line)
	if len(s.trace) > 400 {
		s.trace = s.trace[len(s.trace)-300:]
	}
}

func (s *sim) at(d time.Duration, fn func()) {
	s.seq++
	heap.Push(&s.q, &simEvent{at: s.now + max(d, 0), seq: s.seq, fn: fn})
}

func (s *sim) newClock() simClock {
	r := 1 + (2*s.rng.Float64()-1)*s.cfg.drift
	if s.rng.IntN(3) == 0 { // the extremes often
		r = 1 + s.cfg.drift
		if s.rng.IntN(2) == 0 {
			r = 1 - s.cfg.drift
		}
	}
	return simClock{rate: r, off: time.Duration(s.rng.Int64N(int64(1000 * time.Hour)))}
}

func (s *sim) jitter(d time.Duration) time.Duration {
	return time.Duration(s.rng.Int64N(int64(d) + 1))
}

func (s *sim) addParty(standby bool) *simParty {
	s.names++
	role := "primary"
	if standby {
		role = "standby"
	}
	p := &simParty{name: fmt.Sprintf("%s%d", role, s.names), clk: s.newClock(), standby: standby,
		linkUp: true, pending: map[uint64]simPending{}}
	p.holder = p.name + " #sim"
	s.parties = append(s.parties, p)
	s.schedule(p, s.jitter(s.cfg.lease/4))
	return p
}

// send puts a request on p's link towards the witness.
func (s *sim) send(p *simParty, q request) {
	p.nextID++
	q.id = p.nextID
	var gen uint64
	if p.core != nil {
		gen = p.core.gen.Load()
	}
	p.pending[q.id] = simPending{sentAt: p.clk.at(s.now), q: q, gen: gen}
	wire := appendRequest(nil, &q)
	if !p.linkUp || s.rng.IntN(20) == 0 {
		return // partitioned, or lost
	}
	s.at(s.delay(), func() { s.deliver(p, wire) })
}

func (s *sim) delay() time.Duration {
	if s.rng.IntN(25) == 0 {
		return s.jitter(3 * s.cfg.lease / 2) // a very late message
	}
	return s.jitter(s.cfg.lease / 20)
}

// deliver: the witness applies a request and answers.
func (s *sim) deliver(p *simParty, wire []byte) {
	if !s.w.up {
		return
	}
	q, err := parseRequest(wire)
	if err != nil {
		panic(err)
	}
	rep, g := s.w.tab.apply(s.w.clk.at(s.now), &q)
	if s.w.tab.broken != nil {
		s.logf("witness: save uncertain: stops")
		s.crashWitness()
		return
	}
	if g != nil {
		s.grants = append(s.grants, simGrant{at: s.now, gen: g.Generation, holder: g.Holder})
		s.stats.grants++
		s.logf("witness: generation %d to %s (was %s)", g.Generation, g.Holder, g.Previous)
	}
	out := appendReply(nil, &rep)
	if !p.linkUp || s.rng.IntN(20) == 0 {
		return
	}
	s.at(s.delay(), func() {
		if s.now < p.stoppedUntil {
			p.inbox = append(p.inbox, func() { s.receive(p, out) })
			return
		}
		s.receive(p, out)
	})
}

func (s *sim) save(recs []durable) error {
	switch s.rng.IntN(30) {
	case 0:
		return errors.New("disk full")
	case 1:
		s.stats.uncertain++
		if s.rng.IntN(2) == 0 {
			s.w.disk = encodeState(recs)
		}
		return errSaveUncertain
	}
	s.w.disk = encodeState(recs)
	s.w.saves++
	return nil
}

func (s *sim) crashWitness() {
	if !s.w.up {
		return
	}
	s.w.up, s.w.tab = false, nil
	s.at(s.jitter(2*s.cfg.lease), s.restartWitness)
}

func (s *sim) restartWitness() {
	recs, err := decodeState(s.w.disk)
	if len(s.w.disk) == 0 {
		recs, err = nil, nil
	}
	if err != nil {
		panic(err)
	}
	s.w.clk = s.newClock()
	s.w.tab = newTable(recs, s.w.clk.at(s.now), s.save, time.Minute, 16)
	if s.cfg.noGrace {
		for _, e := range s.w.tab.recs {
			e.expires = s.w.clk.at(s.now)
		}
	}
	s.w.up = true
	s.stats.restarts++
	s.logf("witness: restarted with %v", recs)
}

// grantTo applies a grant answered to a request sent at sentAt (or, in
// the broken variants, the wrong way).
func (s *sim) grantTo(p *simParty, sentAt time.Duration, lease time.Duration) {
	switch {
	case s.cfg.fromReply:
		p.core.grant(p.clk.at(s.now), lease, p.margin)
	case s.cfg.fullLease:
		p.core.lease.Store(int64(lease))
		p.core.extendTo(sentAt + lease)
	default:
		p.core.grant(sentAt, lease, p.margin)
	}
}

// receive: p handles an answer, as Client.acquire and Lease do.
func (s *sim) receive(p *simParty, wire []byte) {
	rep, err := parseReply(wire)
	if err != nil {
		panic(err)
	}
	pd, ok := p.pending[rep.id]
	if !ok {
		return
	}
	delete(p.pending, rep.id)
	if p.dead {
		return
	}
	q := pd.q
	switch {
	case p.core == nil && q.op == opAcquire:
		switch {
		case rep.result == resultOK && rep.holder == p.holder && (!q.base || rep.gen == q.gen+1):
			p.core = newLeaseCore("vm0", p.holder, rep.gen)
			p.margin = defaultMargin(rep.lease)
			s.grantTo(p, pd.sentAt, rep.lease)
			if q.base {
				s.stats.claims++
			}
			s.logf("%s: holds generation %d until %v (local)", p.name, rep.gen, time.Duration(p.core.validUntil.Load()))
		case rep.result == resultHeld:
			// Ask again right when the lease should run out at the
			// witness: the edge where a mistake would show.
			s.at(p.clk.real(rep.remaining)+s.jitter(s.cfg.lease/100), func() {
				if !p.dead && p.core == nil && s.now >= p.stoppedUntil {
					s.send(p, q)
				}
			})
		case rep.result == resultSuperseded || rep.result == resultUnknown:
			if p.standby {
				p.base = 0 // its replica is stale: it waits to be protected again
			}
		}
	case p.core == nil:
	case q.op == opAcquire && q.base && q.gen == pd.gen: // an advance
		switch {
		case rep.result == resultOK && rep.holder == p.holder && rep.gen == pd.gen+1:
			if rep.gen > p.core.gen.Load() {
				p.core.gen.Store(rep.gen)
			}
			s.grantTo(p, pd.sentAt, rep.lease)
			s.stats.advances++
		case judge(p.holder, pd.gen, &rep) == verdictFenced:
			s.fence(p, &rep)
		}
	case q.op == opRenew:
		switch judge(p.holder, pd.gen, &rep) {
		case verdictGranted:
			s.grantTo(p, pd.sentAt, rep.lease)
		case verdictFenced:
			s.fence(p, &rep)
		}
	}
}

func (s *sim) fence(p *simParty, rep *reply) {
	if p.core.fence(&FencedError{VM: "vm0", Generation: p.core.gen.Load(), Current: rep.gen, Holder: rep.holder}) {
		s.stats.fences++
		s.logf("%s: fenced by generation %d of %s", p.name, rep.gen, rep.holder)
	}
	p.dead = true
	s.addParty(p.standby) // a new VMM takes its place
}

// schedule sets p's next move d from now, replacing any other.
func (s *sim) schedule(p *simParty, d time.Duration) {
	p.actToken++
	tok := p.actToken
	s.at(d, func() {
		if tok == p.actToken {
			s.act(p)
		}
	})
}

// act is a party's next move.
func (s *sim) act(p *simParty) {
	if p.dead {
		return
	}
	if s.now < p.stoppedUntil {
		return // it acts again when continued
	}
	l := s.cfg.lease
	switch {
	case p.core != nil:
		gen := p.core.gen.Load()
		switch r := s.rng.IntN(200); {
		case r == 0:
			p.core.ended.Store(true)
			p.dead = true
			s.stats.resigns++
			s.logf("%s: resigns generation %d", p.name, gen)
			s.send(p, request{op: opResign, gen: gen, vm: "vm0", holder: p.holder})
			s.addParty(p.standby)
			return
		case r < 4:
			s.send(p, request{op: opAcquire, base: true, gen: gen, vm: "vm0", holder: p.holder, lease: l})
		default:
			s.send(p, request{op: opRenew, gen: gen, vm: "vm0", holder: p.holder})
		}
		s.schedule(p, p.clk.real(l/4)+s.jitter(l/50))
	case p.standby && p.base == 0:
		s.schedule(p, p.clk.real(l/2))
	case p.standby:
		if s.rng.IntN(3) == 0 { // it has lost its primary (or thinks so)
			s.send(p, request{op: opAcquire, base: true, gen: p.base, vm: "vm0", holder: p.holder, lease: l})
		}
		s.schedule(p, p.clk.real(l/8)+s.jitter(l/50))
	default:
		if s.rng.IntN(4) == 0 {
			s.send(p, request{op: opAcquire, vm: "vm0", holder: p.holder, lease: l})
		}
		s.schedule(p, p.clk.real(l/8)+s.jitter(l/50))
	}
}

// chaos is the environment: partitions, stops, crashes, and the
// replication stream telling standbys their primary's generation.
func (s *sim) chaos() {
	l := s.cfg.lease
	s.at(s.jitter(l/2), s.chaos)
	live := s.parties[:0:0]
	for _, p := range s.parties {
		if !p.dead {
			live = append(live, p)
		}
	}
	p := live[s.rng.IntN(len(live))]
	switch s.rng.IntN(10) {
	case 0, 1:
		p.linkUp = !p.linkUp
		s.logf("%s: link %v", p.name, map[bool]string{true: "up", false: "cut"}[p.linkUp])
	case 2:
		d := s.jitter(3 * l)
		p.stoppedUntil = s.now + d
		s.logf("%s: stopped for %v", p.name, d)
		s.at(d, func() {
			if s.now < p.stoppedUntil {
				return
			}
			in := p.inbox
			p.inbox = nil
			for _, fn := range in {
				fn()
			}
			s.schedule(p, 0)
		})
	case 3:
		if s.w.up && s.rng.IntN(3) == 0 {
			s.logf("witness: crashes")
			s.crashWitness()
		}
	default:
		// A standby is (re)protected by some holder: its replica now
		// descends from that holder's generation.
		if !p.standby || p.core != nil {
			return
		}
		for _, h := range live {
			if h.core != nil && s.rng.IntN(2) == 0 {
				p.base = h.core.gen.Load()
				s.logf("%s: replicating generation %d from %s", p.name, p.base, h.name)
				return
			}
		}
	}
}

// check is the invariant at the current instant.
func (s *sim) check() {
	s.stats.checks++
	var releasing []*simParty
	for _, p := range s.parties {
		if p.core != nil && p.core.canRelease(p.clk.at(s.now)) {
			releasing = append(releasing, p)
		}
	}
	if len(releasing) > 0 {
		s.stats.releasing++
	}
	for _, p := range releasing {
		gen := p.core.gen.Load()
		for _, g := range s.grants {
			if g.gen > gen && g.holder != p.holder {
				s.bad = fmt.Sprintf("%s may release under generation %d (until %v local, now %v) but generation %d went to %s at %.3fs",
					p.name, gen, time.Duration(p.core.validUntil.Load()), p.clk.at(s.now), g.gen, g.holder, g.at.Seconds())
				return
			}
		}
	}
	if len(releasing) > 1 {
		s.bad = fmt.Sprintf("%s and %s may both release", releasing[0].name, releasing[1].name)
	}
}

func runSim(seed uint64, cfg simConfig) *sim {
	s := &sim{cfg: cfg, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
	s.w.clk = s.newClock()
	s.w.tab = newTable(nil, s.w.clk.at(0), s.save, time.Minute, 16)
	s.w.up = true
	s.addParty(false)
	s.addParty(true)
	s.addParty(true)
	s.at(s.jitter(5*cfg.lease), func() { s.addParty(false) }) // a second primary, started by mistake
	s.at(0, s.chaos)
	var probe func()
	probe = func() { s.at(s.jitter(cfg.lease/25), probe) }
	probe()
	for s.q.Len() > 0 && s.bad == "" {
		e := heap.Pop(&s.q).(*simEvent)
		if e.at > cfg.duration {
			break
		}
		s.now = e.at
		e.fn()
		s.check()
	}
	return s
}

func TestSimulationNeverTwoEmitters(t *testing.T) {
	seeds := 2000
	if testing.Short() || raceEnabled {
		seeds = 200
	}
	cfg := simConfig{lease: time.Second, duration: 120 * time.Second, drift: MaxDrift}
	// The default margin (a tenth of the lease) also absorbs clock rates
	// far worse than MaxDrift: up to ±4.9% here.
	for seed := range uint64(seeds / 10) {
		if s := runSim(seed, simConfig{lease: time.Second, duration: 120 * time.Second, drift: 0.045}); s.bad != "" {
			t.Fatalf("drift 4.5%%: seed %d: %s\n%s", seed, s.bad, strings.Join(s.trace, "\n"))
		}
	}
	var total simStats
	for seed := range uint64(seeds) {
		s := runSim(seed, cfg)
		if s.bad != "" {
			t.Fatalf("seed %d: %s\n%s", seed, s.bad, strings.Join(s.trace, "\n"))
		}
		total.add(s.stats)
	}
	t.Logf("%d runs of %v: %+v", seeds, cfg.duration, total)
	// The runs did exercise what they claim to.
	require.Greater(t, total.claims, seeds, "standbys won generations")
	require.Greater(t, total.fences, seeds, "primaries were fenced")
	require.Greater(t, total.advances, seeds)
	require.Greater(t, total.resigns, seeds/4)
	require.Greater(t, total.restarts, seeds)
	require.Greater(t, total.uncertain, seeds/4)
	require.Greater(t, total.releasing, total.checks/3, "someone could release most of the time")
}

// The check has teeth: break the lease timing and it finds two emitters.
func TestSimulationCatchesBrokenLeases(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  simConfig
	}{
		{"validity from the reply's arrival", simConfig{fromReply: true}},
		// At MaxDrift the unsafe window is 2ms a lease, which random runs
		// seldom hit; clocks 20 times worse than allowed widen it.
		{"whole lease, clocks drifting apart", simConfig{fullLease: true, drift: 20 * MaxDrift}},
		{"witness forgets leases when it restarts", simConfig{noGrace: true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.lease, cfg.duration = time.Second, 120*time.Second
			if cfg.drift == 0 {
				cfg.drift = MaxDrift
			}
			for seed := range uint64(500) {
				if s := runSim(seed, cfg); s.bad != "" {
					t.Logf("seed %d: %s", seed, s.bad)
					return
				}
			}
			t.Fatal("no violation found: the check is blind")
		})
	}
}
