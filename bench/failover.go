package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"govmm/ctlapi"
	"govmm/internal/tinyguest"
)

// FailoverConfig parameterises the failover suite.
type FailoverConfig struct {
	Govmm    string          // the govmm binary
	Timeouts []time.Duration // --failover-timeout values to try
	Trials   int             // per timeout and mode
	Pages    int             // the primary's Dirtier working set (default 256)
	Epoch    time.Duration   // --epoch (default 20ms)
	// Witness also runs every trial with a `govmm witness` (lease = the
	// failover timeout, as docs/FENCING.md advises), beside the trial
	// without one.
	Witness bool
	Out     string
	Log     io.Writer
}

// Failure modes of the primary.
const (
	FailKill = "sigkill" // the process dies; the kernel closes its TCP connection
	FailStop = "sigstop" // the process freezes; the connection stays open and silent
)

// FailoverSample is one failover.
type FailoverSample struct {
	Mode    string
	Timeout time.Duration
	Witness bool // with a witness (lease = Timeout)
	Trial   int
	// Answer is from the signal to the primary to the first answer of
	// the standby's control API (GET /vm) that says the guest runs there.
	Answer time.Duration
	// Claim is, with a witness, how long the standby took to win the next
	// generation (part of Takeover).
	Claim time.Duration
	// Takeover is what the standby reports for resuming the replica
	// (detection to running), and Epoch the checkpoint it resumed from.
	Takeover time.Duration
	Epoch    uint64
	Cause    string
	// Running is, where measured (failover-guest), from the signal until
	// the standby's log says it took over: its detection of the loss and
	// the takeover. The rest of Answer is the client reaching the guest.
	Running time.Duration
}

// FailoverResult is everything the suite measured.
type FailoverResult struct {
	Samples []FailoverSample
	Config  FailoverConfig
}

// Failover runs a `govmm standby` and a `govmm run --replicate-to` of a
// tiny dirtying guest as separate processes, kills or freezes the
// primary, and times the standby's control API's first answer.
func Failover(ctx context.Context, cfg FailoverConfig) (*FailoverResult, error) {
	if cfg.Govmm == "" {
		return nil, errors.New("failover: the govmm binary is needed")
	}
	if len(cfg.Timeouts) == 0 {
		cfg.Timeouts = []time.Duration{200 * time.Millisecond, 500 * time.Millisecond, time.Second}
	}
	if cfg.Trials <= 0 {
		cfg.Trials = 10
	}
	if cfg.Pages <= 0 {
		cfg.Pages = 256
	}
	if cfg.Epoch <= 0 {
		cfg.Epoch = 20 * time.Millisecond
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	dir, err := os.MkdirTemp("", "govmm-bench-failover-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	kernel, initrd := filepath.Join(dir, "dirtier"), filepath.Join(dir, "initrd")
	if err := os.WriteFile(kernel, tinyguest.Kernel(guestCode(cfg.Pages)), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(initrd, []byte("x"), 0o644); err != nil {
		return nil, err
	}
	// Every trial uses a key (a witness needs one), with or without a
	// witness, so that the two differ in the witness alone.
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("govmm-bench-failover-key-0123456"), 0o600); err != nil {
		return nil, err
	}
	var wit *witnessProc
	if cfg.Witness {
		if wit, err = startWitness(ctx, cfg.Govmm, dir, keyFile); err != nil {
			return nil, err
		}
		defer wit.kill()
	}
	res := &FailoverResult{Config: cfg}
	for trial := 1; trial <= cfg.Trials; trial++ {
		for _, to := range cfg.Timeouts {
			for _, mode := range []string{FailKill, FailStop} {
				for _, w := range cfg.witnessModes() {
					witAddr := ""
					if w {
						witAddr = wit.addr
					}
					s, err := failoverTrial(ctx, cfg, dir, kernel, initrd, keyFile, witAddr, mode, to, trial)
					if err != nil {
						return res, fmt.Errorf("failover %s timeout %v witness %v trial %d: %w", mode, to, w, trial, err)
					}
					s.Trial = trial
					fmt.Fprintf(cfg.Log, "failover: %-7s timeout %-6v witness %-5v trial %2d: answer after %7.1f ms (takeover %v, claim %v, at epoch %d)\n",
						mode, to, w, trial, msOf(s.Answer), s.Takeover, s.Claim, s.Epoch)
					res.Samples = append(res.Samples, s)
				}
			}
		}
	}
	if cfg.Out != "" {
		if err := res.write(cfg.Out); err != nil {
			return res, err
		}
	}
	return res, nil
}

// lockedBuffer collects a process's stderr for polling.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor polls buf until it contains s, the process exits, or timeout.
func waitFor(ctx context.Context, buf *lockedBuffer, exited <-chan struct{}, s string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !strings.Contains(buf.String(), s) {
		select {
		case <-exited:
			return fmt.Errorf("exited before %q: %s", s, lastLine(buf.String()))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %q within %v: %s", s, timeout, lastLine(buf.String()))
		}
	}
	return nil
}

// proc is a govmm process in its own process group.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr *lockedBuffer // the guest's console, govmm's log
	exited         chan struct{}
}

func startProc(govmm string, args ...string) (*proc, error) {
	p := &proc{cmd: exec.Command(govmm, args...), stdout: &lockedBuffer{}, stderr: &lockedBuffer{}, exited: make(chan struct{})}
	p.cmd.Stdout = p.stdout
	p.cmd.Stderr = p.stderr
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	return p, nil
}

func (p *proc) signal(sig syscall.Signal) error { return syscall.Kill(-p.cmd.Process.Pid, sig) }

// keepLogs writes the process's log and console as name.log and
// name.console into dir, for a trial that failed.
func (p *proc) keepLogs(dir, name string) {
	if p == nil || dir == "" {
		return
	}
	_ = os.WriteFile(filepath.Join(dir, name+".log"), []byte(p.stderr.String()), 0o644)
	_ = os.WriteFile(filepath.Join(dir, name+".console"), []byte(p.stdout.String()), 0o644)
}

func (p *proc) kill() {
	_ = p.signal(syscall.SIGKILL)
	<-p.exited
}

func (cfg FailoverConfig) witnessModes() []bool {
	if cfg.Witness {
		return []bool{false, true}
	}
	return []bool{false}
}

// witnessProc is the suite's `govmm witness`.
type witnessProc struct {
	*proc
	addr string
}

func startWitness(ctx context.Context, govmm, dir, keyFile string) (*witnessProc, error) {
	p, err := startProc(govmm, "witness", "--listen", "127.0.0.1:0", "--key-file", keyFile, "--state", filepath.Join(dir, "witness"))
	if err != nil {
		return nil, err
	}
	if err := waitFor(ctx, p.stderr, p.exited, "listening on ", 30*time.Second); err != nil {
		p.kill()
		return nil, fmt.Errorf("witness: %w", err)
	}
	m := regexp.MustCompile(`listening on (\S+)`).FindStringSubmatch(p.stderr.String())
	return &witnessProc{proc: p, addr: m[1]}, nil
}

var (
	tookOver = regexp.MustCompile(`primary lost \((.*)\); took over at checkpoint (\d+) in (\S+)`)
	claimed  = regexp.MustCompile(`won generation \d+ at the witness in (\S+)\)`)
)

func failoverTrial(ctx context.Context, cfg FailoverConfig, dir, kernel, initrd, keyFile, witness, mode string,
	timeout time.Duration, trial int) (FailoverSample, error) {
	s := FailoverSample{Mode: mode, Timeout: timeout, Witness: witness != ""}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return s, err
	}
	addr := ln.Addr().String()
	ln.Close()
	sbSock, pSock := filepath.Join(dir, "standby.sock"), filepath.Join(dir, "primary.sock")
	_ = os.Remove(sbSock)
	_ = os.Remove(pSock)
	// Each trial is its own VM at the witness (a fresh generation 1).
	common := append([]string{"--net", "none"}, replicationFlags(timeout, keyFile, fmt.Sprintf("bench-%s-%v-%d", mode, timeout, trial), witness)...)
	sb, err := startStandbyProc(ctx, cfg.Govmm, 30*time.Second, append([]string{"--listen", addr, "--api-sock", sbSock}, common...)...)
	if err != nil {
		return s, err
	}
	defer sb.kill()
	prim, err := startProc(cfg.Govmm, append([]string{"run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M",
		"--api-sock", pSock, "--replicate-to", addr, "--epoch", cfg.Epoch.String()}, common...)...)
	if err != nil {
		return s, err
	}
	defer prim.kill()
	if err := waitFor(ctx, prim.stderr, prim.exited, "protected by", time.Minute); err != nil {
		return s, fmt.Errorf("primary: %w", err)
	}
	time.Sleep(10*cfg.Epoch + 100*time.Millisecond) // some checkpoints commit

	client := ctlapi.NewClient(sbSock)
	defer client.Close()
	t0 := time.Now()
	if err := prim.signal(failSignal(mode)); err != nil {
		return s, err
	}
	if s.Answer, err = awaitTakeover(ctx, client, sb, t0, t0.Add(timeout+30*time.Second)); err != nil {
		return s, err
	}
	s.readStandbyLog(sb.stderr.String())
	return s, nil
}

// replicationFlags are the flags a trial's primary and standby share:
// both ends' failover timeout, the key, the VM's name (each trial is a VM
// of its own at the witness) and, with a witness, its address and a lease
// of the failover timeout.
func replicationFlags(timeout time.Duration, keyFile, name, witness string) []string {
	to := timeout.String()
	f := []string{"--failover-timeout", to, "--key-file", keyFile, "--name", name}
	if witness != "" {
		f = append(f, "--witness", witness, "--witness-lease", to)
	}
	return f
}

// startStandbyProc starts `govmm standby args...` and waits up to wait for
// it to listen.
func startStandbyProc(ctx context.Context, govmm string, wait time.Duration, args ...string) (*proc, error) {
	sb, err := startProc(govmm, append([]string{"standby"}, args...)...)
	if err != nil {
		return nil, err
	}
	if err := waitFor(ctx, sb.stderr, sb.exited, "listening on", wait); err != nil {
		sb.kill()
		return nil, fmt.Errorf("standby: %w", err)
	}
	return sb, nil
}

// failSignal is how a trial of mode fails its primary.
func failSignal(mode string) syscall.Signal {
	if mode == FailStop {
		return syscall.SIGSTOP
	}
	return syscall.SIGKILL
}

// awaitTakeover polls the standby's control API until it no longer
// stands by, and returns how long after t0 that was.
func awaitTakeover(ctx context.Context, client *ctlapi.Client, sb *proc, t0, deadline time.Time) (time.Duration, error) {
	for {
		cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		info, err := client.Info(cctx)
		cancel()
		if err == nil && info.State != "standing by" { // the standby's API answers while standing by too
			return time.Since(t0), nil
		}
		if err == nil {
			err = fmt.Errorf("still standing by: %s", info.Fencing)
		}
		select {
		case <-sb.exited:
			return 0, fmt.Errorf("standby exited: %s", lastLine(sb.stderr.String()))
		case <-ctx.Done():
			return 0, ctx.Err()
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("standby did not answer within %v: %v", deadline.Sub(t0), err)
		}
		time.Sleep(500 * time.Microsecond)
	}
}

// readStandbyLog fills in what the standby logged of its takeover: the
// cause, the checkpoint it resumed from, how long the takeover and (with
// a witness) the claim took.
func (s *FailoverSample) readStandbyLog(log string) {
	if m := tookOver.FindStringSubmatch(log); m != nil {
		s.Cause = m[1]
		s.Epoch, _ = strconv.ParseUint(m[2], 10, 64)
		s.Takeover, _ = time.ParseDuration(m[3])
	}
	if m := claimed.FindStringSubmatch(log); m != nil {
		s.Claim, _ = time.ParseDuration(m[1])
	}
}

type failoverGroup struct {
	mode    string
	timeout time.Duration
	witness bool
	answer  Summary
	took    Summary
	claim   Summary
	values  []float64
}

func (r *FailoverResult) groups() []failoverGroup {
	var out []failoverGroup
	for _, to := range r.Config.Timeouts {
		for _, mode := range []string{FailKill, FailStop} {
			for _, w := range r.Config.witnessModes() {
				g := failoverGroup{mode: mode, timeout: to, witness: w}
				var took, claim []float64
				for _, s := range r.Samples {
					if s.Mode == mode && s.Timeout == to && s.Witness == w {
						g.values = append(g.values, msOf(s.Answer))
						took = append(took, msOf(s.Takeover))
						claim = append(claim, msOf(s.Claim))
					}
				}
				if len(g.values) == 0 {
					continue
				}
				g.answer, g.took, g.claim = Summarize(g.values), Summarize(took), Summarize(claim)
				out = append(out, g)
			}
		}
	}
	return out
}

func (r *FailoverResult) write(dir string) error {
	var rows [][]string
	for _, s := range r.Samples {
		rows = append(rows, []string{s.Mode, ftoa(msOf(s.Timeout), 0), strconv.FormatBool(s.Witness), strconv.Itoa(s.Trial),
			ftoa(msOf(s.Answer), 3), ftoa(msOf(s.Takeover), 3), ftoa(msOf(s.Claim), 3), strconv.FormatUint(s.Epoch, 10), s.Cause})
	}
	if err := writeCSV(filepath.Join(dir, "failover.csv"), []string{"mode", "failover_timeout_ms", "witness", "trial", "answer_ms",
		"takeover_ms", "claim_ms", "resumed_epoch", "cause"}, rows); err != nil {
		return err
	}
	var names []string
	var values [][]float64
	for _, g := range r.groups() {
		name := fmt.Sprintf("%s, timeout %v", g.mode, g.timeout)
		if g.witness {
			name += ", witness"
		}
		names = append(names, name)
		values = append(values, g.values)
	}
	return boxes(filepath.Join(dir, "failover.png"), "Primary failure to the standby's first API answer", "time (ms)", true, names, values)
}

// Report renders the failover section of report.md.
func (r *FailoverResult) Report() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\n\nGuest: `tinyguest.Dirtier` over %d pages in a 64 MiB, one-vCPU guest. Each trial starts `govmm standby --listen 127.0.0.1:PORT --net none --api-sock S --failover-timeout T` "+
		"and `govmm run --replicate-to 127.0.0.1:PORT --epoch %v --failover-timeout T --net none` as separate processes, waits for protection and %v more, "+
		"then signals the primary's process group and polls the standby's control API (`ctlapi.Client.Info`, GET /vm, every 0.5 ms) until it answers. "+
		"*sigkill*: the primary dies, the kernel closes its TCP connection and the standby sees the stream break at once. "+
		"*sigstop*: the primary freezes with its connection open (a silent primary); only the failover timeout detects it. "+
		"*takeover* is what the standby itself logs for resuming the replica after detection (with a witness, the claim of the next generation included; *claim* alone). "+
		"Every trial uses a pre-shared key; *witness* trials add `--witness` (a `govmm witness` on loopback) with `--witness-lease T`: the standby of a SIGKILLed primary then waits for the dead primary's lease to run out (at most T after its last renewal), "+
		"while a SIGSTOPped primary's lease has run out by the time its silence is detected. Raw data `failover.csv`, plot `failover.png` (log time axis; box: p25–p75 with the median; whiskers 1.5 IQR).\n\n",
		platform(), r.Config.Pages, r.Config.Epoch, 10*r.Config.Epoch+100*time.Millisecond)
	b.WriteString("| mode | failover timeout | witness | trials | answer median ms | p25 | p75 | min | max | takeover median ms | claim median ms |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, g := range r.groups() {
		a := g.answer
		w := "no"
		if g.witness {
			w = "yes"
		}
		fmt.Fprintf(&b, "| %s | %v | %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f |\n", g.mode, g.timeout, w, a.N, a.Median, a.P25, a.P75, a.Min, a.Max, g.took.Median, g.claim.Median)
	}
	return b.String()
}
