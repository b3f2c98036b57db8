package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/guestrig"
	"govmm/internal/kvmtest"
)

// Real-guest fencing tests (docs/FENCING.md, issue 11): a witness, a
// primary and a standby of the default guest, each VMM on a TAP of its
// own on one bridge, a keep-alive client whose history is checked
// (counter +1 each time, every acknowledged line in GET /log), and a
// capture of the frames each VMM writes into its TAP: their emitting
// periods must never overlap (exactly one emitter at any moment).

// labWitnessLease is the lease both ends ask for here: about the
// failover timeout, and long enough for the lab's slow renewals.
const labWitnessLease = "2s"

// fenceLab is one booted guest and the VMMs that carry it in turn.
type fenceLab struct {
	t     *testing.T
	r     *guestrig.Rig
	key   string
	w     *witnessProc
	wire  *tapCapture
	n     int    // VMMs started
	gen   uint64 // the generation the live VMM holds
	h     *guestrig.History
	k, kb *guestrig.Client
	stop  func() // the load
}

// fenceVMM is a govmm run or standby of a fenceLab.
type fenceVMM struct {
	*vmmProc
	name, tap, sock string
	addr            string // a standby's listening address
}

func newFenceLab(t *testing.T) *fenceLab {
	r := guestrig.New(t)
	key, _ := writeKey(t)
	w := &witnessProc{t: t, addr: "127.0.0.1:7400", key: key, dir: filepath.Join(r.Dir, "witness"), ns: r.NS}
	w.start()
	t.Cleanup(w.stop)
	return &fenceLab{t: t, r: r, key: key, w: w, wire: newTapCapture(t)}
}

// vmm starts govmm sub (run or standby) on a new TAP and a blank disk,
// with the witness at witnessAddr.
func (fl *fenceLab) vmm(sub, witnessAddr string, extra ...string) *fenceVMM {
	t := fl.t
	t.Helper()
	fl.n++
	v := &fenceVMM{name: fmt.Sprintf("%s%d", sub, fl.n), tap: fmt.Sprintf("gfv%d", fl.n)}
	_, err := fl.r.TAP(v.tap)
	require.NoError(t, err)
	require.NoError(t, fl.wire.watch(fl.r.NS, v.tap))
	v.sock = filepath.Join(fl.r.Dir, v.name+".sock")
	disk := fl.r.BlankDisk(v.name+".img", 64<<20)
	args := append([]string{sub, "--net", "tap:" + v.tap, "--disk", disk, "--guest-ip", fl.r.GuestIP.String(),
		"--failover-timeout", labFailoverTimeout, "--key-file", fl.key, "--witness", witnessAddr,
		"--witness-lease", labWitnessLease, "--api-sock", v.sock}, extra...)
	v.vmmProc = startVMM(t, fl.r, v.name, args...)
	return v
}

// standby starts a standby that reaches the witness at witnessAddr.
func (fl *fenceLab) standby(witnessAddr string) *fenceVMM {
	addr := fmt.Sprintf("127.0.0.1:%d", 7100+fl.n+1)
	v := fl.vmm("standby", witnessAddr, "--listen", addr)
	v.addr = addr
	v.await(fl.t, v.log, "listening on", time.Minute)
	return v
}

// boot starts the primary (generation 1 at the witness), waits until the
// guest serves, has it replicate to to (ctl replicate, as an operator
// protects a running guest), loads it and starts the checked client.
//
// The guest boots unreplicated: booting under replication is
// TestGuestReplicatedBootNoFalseTakeover's and the failover test's to
// show, and in the lab it took 3–4 of each fencing test's 4–6 minutes
// (2026-12-01: ready some 200 s after "protected", against a bound of
// 240 s).
func (fl *fenceLab) boot(to string) *fenceVMM {
	t := fl.t
	start := time.Now()
	p := fl.vmm("run", fl.w.addr)
	t.Cleanup(func() {
		if t.Failed() && !p.con.Contains(guestimg.ReadyLine) {
			info, _, _ := govmm(t, 30*time.Second, "ctl", "--api-sock", p.sock, "info")
			metrics, _, _ := govmm(t, 30*time.Second, "ctl", "--api-sock", p.sock, "metrics")
			t.Logf("%s never got ready: ctl info:\n%s\nmetrics:\n%s", p.name, info, metrics)
		}
	})
	p.await(t, p.con, guestimg.ReadyLine, 4*time.Minute)
	t.Logf("%s: the guest is ready %v after start", p.name, time.Since(start).Round(time.Millisecond))
	p.infoHas(t, time.Minute, "generation 1, lease valid")
	_, errOut, status := govmm(t, 10*time.Minute, append([]string{"ctl", "--api-sock", p.sock, "replicate", "--to", to}, guestrig.EpochArgs()...)...)
	require.Equal(t, 0, status, "ctl replicate: %s", errOut)
	p.await(t, p.log, "protected by", time.Minute)
	t.Logf("%s: protected %v after start", p.name, time.Since(start).Round(time.Millisecond))
	for _, l := range guestrig.GuestLoad {
		_, err := io.WriteString(p.stdin, l+"\n")
		require.NoError(t, err)
	}
	fl.gen = 1
	fl.k, fl.kb = fl.r.Dial(t), fl.r.Dial(t)
	fl.h = &guestrig.History{}
	fl.stop = guestrig.StartLoad(t, fl.h, fl.k, fl.kb)
	fl.h.WaitAnswers(t, 3, 5*time.Minute, "the protected guest answers")
	return p
}

// info is the VMM's ctl info ("" while it does not answer).
func (v *fenceVMM) info(t *testing.T) string {
	out, _, _ := govmm(t, 30*time.Second, "ctl", "--api-sock", v.sock, "info")
	return out
}

// infoHas waits until ctl info has every one of want.
func (v *fenceVMM) infoHas(t *testing.T, timeout time.Duration, want ...string) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out := v.info(t)
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(out, w)
		}
		if ok {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: ctl info never had %q within %v; last:\n%s", v.name, want, timeout, out)
		}
		time.Sleep(250 * time.Millisecond) // polling ctl info
	}
}

// signal sends sig to the VMM's process group.
func (v *fenceVMM) signal(t *testing.T, sig syscall.Signal) {
	require.NoError(t, syscall.Kill(-v.cmd.Process.Pid, sig))
}

// exitStatus waits for the VMM to exit and returns its status.
func (v *fenceVMM) exitStatus(t *testing.T, timeout time.Duration) int {
	select {
	case err := <-v.exited:
		v.exited <- err
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %v", v.name, timeout)
	}
	return v.cmd.ProcessState.ExitCode()
}

// oneEmitter requires that no two VMMs' emitting periods overlapped and
// logs how many frames each VMM put on the bridge.
func (fl *fenceLab) oneEmitter(t *testing.T, what string) {
	t.Helper()
	require.Eventually(t, fl.wire.caughtUp, time.Minute, 10*time.Millisecond, "%s: the capture's readers catch up with the kernel's queue", what)
	overlaps := fl.wire.twoEmitters()
	require.Empty(t, overlaps, "%s: two VMMs emitted at once:\n%s", what, guestrig.JoinLines(overlaps))
}

func (fl *fenceLab) frames() string {
	var b strings.Builder
	for i := 1; i <= fl.n; i++ {
		tap := fmt.Sprintf("gfv%d", i)
		first, last, n := fl.wire.span(tap)
		if n == 0 {
			fmt.Fprintf(&b, " %s: none;", tap)
			continue
		}
		fmt.Fprintf(&b, " %s: %d frames %s..%s;", tap, n, first.Format("15:04:05.000"), last.Format("15:04:05.000"))
	}
	return b.String()
}

// finish stops the load and checks the history: every acknowledged line
// is in GET /log.
func (fl *fenceLab) finish(t *testing.T) {
	fl.h.KeepsAnswering(t, 5*time.Second, "the guest keeps answering")
	fl.stop()
	_, _, err := fl.h.State()
	require.NoError(t, err, "the client's history")
	fl.h.CheckLog(t, fl.k)
	fl.oneEmitter(t, "at the end")
	n, _, _ := fl.h.State()
	t.Logf("history holds: %d answers; frames:%s", n, fl.frames())
}

// fenceTrial kinds.
const (
	trialStop      = "stop"       // SIGSTOP the primary past the failover timeout, SIGCONT after the takeover
	trialShortStop = "short-stop" // SIGSTOP the primary well under the failover timeout
	trialKill      = "kill"       // SIGKILL the primary
	trialCut       = "cut"        // cut the primary<->standby link only
)

// trial does kind to the pair live (primary) and sb (its standby, behind
// link) at a random moment under load and checks the outcome: which VMM
// carries the guest on, at which generation, what the other says, one
// emitter at any moment, the history. It returns the VMM that carries the
// guest on and whether it is still protected (by sb).
func (fl *fenceLab) trial(t *testing.T, i int, kind string, live, sb *fenceVMM, link *nsProxy) (*fenceVMM, bool) {
	t.Helper()
	// A few answers first (in the lab each takes 4–13 s under the load:
	// 2–11 of them made a trial's wait 1–2 minutes of CI's hour), then a
	// random moment, somewhere in an epoch.
	fl.h.WaitAnswers(t, 1+rand.IntN(4), 5*time.Minute, fmt.Sprintf("trial %d: before", i))
	time.Sleep(time.Duration(rand.Int64N(int64(time.Second)))) // the scenario: a random moment, somewhere in an epoch
	before, _, _ := fl.h.State()
	start := time.Now()
	var next *fenceVMM
	protected := false
	switch kind {
	case trialKill:
		live.signal(t, syscall.SIGKILL)
		sb.await(t, sb.log, "took over at checkpoint", 3*time.Minute)
		fl.gen++
		require.Contains(t, sb.log.Tail(64<<10), fmt.Sprintf("won generation %d at the witness", fl.gen))
		next = sb
	case trialStop:
		live.signal(t, syscall.SIGSTOP)
		sb.await(t, sb.log, "took over at checkpoint", 3*time.Minute)
		fl.gen++
		require.Contains(t, sb.log.Tail(64<<10), fmt.Sprintf("won generation %d at the witness", fl.gen))
		// The new primary serves while the old one is still stopped.
		fl.h.WaitAnswers(t, 1, 3*time.Minute, fmt.Sprintf("trial %d: the standby took over", i))
		time.Sleep(time.Duration(rand.Int64N(int64(2 * time.Second)))) // the scenario: the old primary stays stopped a while longer
		cont := time.Now()
		live.signal(t, syscall.SIGCONT)
		out := live.infoHas(t, 2*time.Minute, "fenced", fmt.Sprintf("FENCED: generation %d of govmm is held by", fl.gen),
			fmt.Sprintf("this VMM held generation %d", fl.gen-1))
		fl.h.WaitAnswers(t, 3, 3*time.Minute, fmt.Sprintf("trial %d: after SIGCONT", i))
		// Exactly one VMM's frames reach the bridge after SIGCONT.
		require.Equal(t, 0, fl.wire.since(live.tap, cont), "trial %d: the fenced primary emitted after SIGCONT", i)
		require.Positive(t, fl.wire.since(sb.tap, cont), "trial %d: the new primary emits", i)
		live.signal(t, syscall.SIGTERM)
		require.Equal(t, fencedStatus, live.exitStatus(t, time.Minute), "trial %d: a fenced VMM's exit status; ctl info was:\n%s", i, out)
		require.Contains(t, live.log.Tail(16<<10), "exiting FENCED (status 3)")
		next = sb
	case trialShortStop:
		live.signal(t, syscall.SIGSTOP)
		time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond) // the scenario: a stop well under the failover timeout
		live.signal(t, syscall.SIGCONT)
		fl.h.WaitAnswers(t, 3, 3*time.Minute, fmt.Sprintf("trial %d: after a short stop", i))
		live.infoHas(t, time.Minute, "primary (protected)", fmt.Sprintf("generation %d, lease valid", fl.gen))
		require.False(t, sb.log.Contains("took over"), "trial %d: a short stop made the standby take over", i)
		next, protected = live, true
	case trialCut:
		link.setCut(true)
		fl.gen++
		out := live.infoHas(t, 3*time.Minute, "primary (UNPROTECTED)", fmt.Sprintf("generation %d, lease valid", fl.gen))
		sb.await(t, sb.log, "not taking over", 3*time.Minute)
		fl.h.WaitAnswers(t, 3, 3*time.Minute, fmt.Sprintf("trial %d: after the cut", i))
		require.False(t, sb.log.Contains("took over at"), "trial %d: the cut-off standby took over", i)
		require.Zero(t, fl.wire.count(sb.tap), "trial %d: the cut-off standby put frames on the bridge", i)
		require.Positive(t, fl.wire.since(live.tap, start), "trial %d: the primary goes on", i)
		t.Logf("trial %d: primary after the cut: %s", i, lineWith(out, "fencing"))
		sb.kill()
		next = live
	default:
		t.Fatalf("trial kind %q", kind)
	}
	fl.h.WaitAnswers(t, 3, 3*time.Minute, fmt.Sprintf("trial %d: %s: carries on", i, kind))
	_, _, err := fl.h.State()
	require.NoError(t, err, "trial %d: the client's history", i)
	fl.oneEmitter(t, fmt.Sprintf("trial %d (%s)", i, kind))
	first := fl.h.AnsweredAt(before)
	t.Logf("trial %d: %s: %s carries on at generation %d; first answer %v after the event",
		i, kind, next.name, fl.gen, first.Sub(start).Round(time.Millisecond))
	return next, protected
}

// protect makes live replicate to a new standby behind a new link and
// waits until that standby could take over.
func (fl *fenceLab) protect(t *testing.T, live *fenceVMM) (*fenceVMM, *nsProxy) {
	t.Helper()
	sb := fl.standby(fl.w.addr)
	link := newNSProxy(t, fl.r.NS, sb.addr)
	_, errOut, status := govmm(t, 10*time.Minute, append([]string{"ctl", "--api-sock", live.sock, "replicate", "--to", link.addr()}, guestrig.EpochArgs()...)...)
	require.Equal(t, 0, status, "ctl replicate: %s", errOut)
	live.infoHas(t, time.Minute, "primary (protected)", fmt.Sprintf("generation %d, lease valid", fl.gen))
	sb.infoHas(t, time.Minute, fmt.Sprintf("failover possible (witness at generation %d)", fl.gen))
	return sb, link
}

func lineWith(s, word string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}

// fencingSoakTrials is how many random trials TestGuestFencingStoppedPrimary
// adds on the same boot: none in CI, GOVMM_SOAK_FENCING in make soak.
func fencingSoakTrials(t *testing.T) int {
	s := os.Getenv("GOVMM_SOAK_FENCING")
	if s == "" {
		return 0
	}
	n, err := strconv.Atoi(s)
	require.NoError(t, err, "GOVMM_SOAK_FENCING")
	return n
}

// The primary is SIGSTOPped past the failover timeout; the standby wins
// generation 2 at the witness and takes over; SIGCONT: the old primary is
// FENCED (ctl info, exit status 3 once stopped) and puts no frame on the
// bridge again, and the client's history holds across it all.
//
// With GOVMM_SOAK_FENCING=N (make soak), N more trials follow on the same
// guest, each on the VMM that carries it on, re-protected by a new standby
// when needed: SIGKILL, a SIGSTOP past the timeout, a short SIGSTOP, or a
// cut of the primary<->standby link, at random moments; the history and
// the one-emitter check span all of them.
func TestGuestFencingStoppedPrimary(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	fl := newFenceLab(t)
	sb := fl.standby(fl.w.addr)
	link := newNSProxy(t, fl.r.NS, sb.addr)
	live := fl.boot(link.addr())
	live.infoHas(t, time.Minute, "primary (protected)", "generation 1, lease valid")
	sb.infoHas(t, time.Minute, "failover possible (witness at generation 1)")
	live, _ = fl.trial(t, 0, trialStop, live, sb, link)
	out := live.infoHas(t, time.Minute, "former standby, took over", "generation 2, lease valid")
	t.Logf("the new primary: %s", lineWith(out, "fencing"))

	n := fencingSoakTrials(t)
	kinds := []string{trialKill, trialStop, trialShortStop, trialCut}
	counts := map[string]int{}
	protected := false
	for i := 1; i <= n; i++ {
		if !protected {
			sb, link = fl.protect(t, live)
		}
		kind := kinds[rand.IntN(len(kinds))]
		counts[kind]++
		live, protected = fl.trial(t, i, kind, live, sb, link)
	}
	fl.finish(t)
	if n > 0 {
		t.Logf("soak: %d trials after the first (%v), %d VMMs, generation %d: 0 broken histories, 0 windows with two emitters",
			n, counts, fl.n, fl.gen)
	}
}

// Only the primary<->standby link is cut; both still reach the witness.
// The standby's claim sees the primary renew and it does not take over
// (it says so and never emits); the primary advances to generation 2 and
// goes on unprotected; the history holds.
func TestGuestFencingLinkCut(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	fl := newFenceLab(t)
	sb := fl.standby(fl.w.addr)
	link := newNSProxy(t, fl.r.NS, sb.addr)
	live := fl.boot(link.addr())
	sb.infoHas(t, time.Minute, "failover possible (witness at generation 1)")
	fl.trial(t, 0, trialCut, live, sb, link)
	t.Logf("the standby: %s", lineWith(sb.log.Tail(16<<10), "not taking over"))
	fl.finish(t)
}

// The witness goes down: replication goes on (the standby's checkpoints
// advance), the primary holds its output (nothing reaches the bridge),
// the standby reports failover impossible. The witness restarts on the
// same state: it kept generation 1 and the guest answers again. Then the
// standby is cut from the witness and the primary SIGKILLed: no takeover,
// and the standby's log and ctl info say why. Healed, the standby wins
// generation 2 and carries the guest on: the history holds, and never
// two emitters.
func TestGuestFencingWitnessDown(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	fl := newFenceLab(t)
	wlink := newNSProxy(t, fl.r.NS, fl.w.addr) // the standby's path to the witness
	sb := fl.standby(wlink.addr())
	live := fl.boot(sb.addr)
	sb.infoHas(t, time.Minute, "failover possible (witness at generation 1)")

	// (d) The witness down.
	fl.w.stop()
	down := time.Now()
	live.infoHas(t, time.Minute, "primary (protected)", "lease EXPIRED: output HELD")
	held := time.Now()
	out := sb.infoHas(t, time.Minute, "failover impossible until the witness answers")
	cp1 := checkpointOf(t, out)
	for deadline := time.Now().Add(2 * time.Minute); checkpointOf(t, out) <= cp1; out = sb.info(t) {
		require.True(t, time.Now().Before(deadline), "the standby's checkpoint stays at %d without the witness", cp1)
		time.Sleep(500 * time.Millisecond) // polling ctl info
	}
	t.Logf("witness down: replication goes on (checkpoint %d, then %d); standby: %s", cp1, checkpointOf(t, out), lineWith(out, "fencing"))
	metrics, _, _ := govmm(t, 30*time.Second, "ctl", "--api-sock", sb.sock, "metrics")
	require.Contains(t, metrics, "govmm_failover_possible 0")
	time.Sleep(2 * time.Second) // the scenario: time passes without a lease, and no frame may leave
	require.Zero(t, fl.wire.since(live.tap, held), "output leaves without a lease (witness down since %s)", down.Format("15:04:05.000"))
	list, errOut, status := govmm(t, 10*time.Second, "witness", "--state", fl.w.dir, "--list")
	require.Equal(t, 0, status, errOut)
	require.Regexp(t, `(?m)^govmm\s+1\s+primary `, list, "the witness's state kept generation 1")
	fl.w.start()
	live.infoHas(t, time.Minute, "primary (protected)", "generation 1, lease valid")
	fl.h.WaitAnswers(t, 3, 3*time.Minute, "the witness back: output flows again")
	sb.infoHas(t, time.Minute, "failover possible (witness at generation 1)")

	// (c) The standby cut from the witness, then the primary killed.
	wlink.setCut(true)
	sb.infoHas(t, time.Minute, "failover impossible until the witness answers")
	live.signal(t, syscall.SIGKILL)
	killed := time.Now()
	out = sb.infoHas(t, 2*time.Minute, "failover impossible for now: primary lost")
	sb.await(t, sb.log, "PRIMARY LOST, FAILOVER IMPOSSIBLE", time.Minute)
	t.Logf("standby cut from the witness, primary killed: %s", lineWith(out, "fencing"))
	time.Sleep(5 * time.Second) // the scenario: more than the failover timeout and the lease, and still no takeover
	out = sb.info(t)
	require.Contains(t, out, "standing by", "no takeover without the witness")
	require.False(t, sb.log.Contains("took over at"))
	require.Zero(t, fl.wire.count(sb.tap), "the standby emitted without winning a generation")

	wlink.setCut(false)
	sb.await(t, sb.log, "took over at checkpoint", 3*time.Minute)
	require.Contains(t, sb.log.Tail(64<<10), "won generation 2 at the witness")
	fl.gen = 2
	fl.h.WaitAnswers(t, 3, 3*time.Minute, "after the healed takeover")
	sb.infoHas(t, time.Minute, "former standby, took over", "generation 2, lease valid")
	t.Logf("healed: the standby took over %v after the kill", time.Since(killed).Round(time.Millisecond))
	fl.finish(t)
}

var checkpointRe = regexp.MustCompile(`checkpoint (\d+)`)

// checkpointOf is the checkpoint a standby's ctl info reports.
func checkpointOf(t *testing.T, info string) uint64 {
	m := checkpointRe.FindStringSubmatch(info)
	require.NotNil(t, m, "no checkpoint in ctl info:\n%s", info)
	n, _ := strconv.ParseUint(m[1], 10, 64)
	return n
}
