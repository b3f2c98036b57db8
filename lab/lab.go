package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"govmm/guestimg"
)

// ErrNoQEMU is returned when qemu-system-x86_64 is not installed.
var ErrNoQEMU = errors.New("qemu-system-x86_64 not found: the lab runs in QEMU; install it with: apt-get install qemu-system-x86")

// ErrTimeout is wrapped by the error of a run that outlived Config.Timeout.
var ErrTimeout = errors.New("lab timed out")

// Config describes one command to run in L1. Only Command is required.
type Config struct {
	// Command is the argv to run inside L1, looked up in the host's PATH
	// (L1 sees the host's file system).
	Command []string
	// Dir is the working directory inside L1; default: the caller's.
	Dir string
	// Env is added to the command's environment, which otherwise holds the
	// caller's PATH, HOME, TERM, the Go variables (GO*), the GOVMM_*
	// variables, and GOVMM_LAB=1.
	Env []string
	// Shares are host directories that L1 mounts writable at the same path
	// (everything else is a read-only view under a throwaway overlay).
	Shares []string
	// Pin is the list of L1's CPUs (taskset's syntax, e.g. "0" or "0-1")
	// the command and everything it starts run on; "" pins to CPU 0 when
	// L1 has more than one, "all" does not pin. Why: the lab's known
	// guest crash (docs/ARCHITECTURE.md, "The lab") strikes guests whose
	// vCPU threads move between L1's CPUs or are kicked from another one;
	// on one CPU it is rare (once in some 60 guests), and L1's other vCPUs still serve
	// its own kernel (9p, interrupts), which a 1-vCPU L1 cannot do
	// without wedging now and then.
	Pin string
	// TraceKVM has L1's init turn KVM's trace events on (exits, injected
	// exceptions, exits to userspace) before the command starts, for
	// guestrig.TraceKVM to show when a real-guest test fails. Off by
	// default: turning them on rewrites L1's kernel code, and L1 died of
	// an RCU stall right after that twice in 8 boots.
	TraceKVM bool
	// Holder, if set, is an argv the command script starts in the
	// background first and waits for until it prints a line: govmm lab
	// --hold-kvm, which keeps one idle VM open in L1 (see HoldKVM).
	Holder []string
	// CPUs and MemMiB size L1; defaults: the host's CPU count (at most 4)
	// and 8192.
	CPUs, MemMiB int
	// ShareCPUs boots L1 even while other L1s hold this host's CPUs (see
	// lockCPUs): its vCPUs share them. For L1s that keep only one vCPU
	// busy (the command pinned to CPU 0), two of them fill a two-CPU host.
	ShareCPUs bool
	// CPUModel is QEMU's -cpu for L1; default DefaultCPUModel. It must
	// offer SVM with nested paging (kvm_amd needs both).
	CPUModel string
	// TCG is QEMU's TCG threading: "multi" (default, one host thread per
	// vCPU) or "single" (one thread runs every vCPU in turn: slower, but
	// free of the races between vCPU threads in QEMU's emulation).
	TCG string
	// Timeout bounds the whole run, boot included; default 60 minutes.
	Timeout time.Duration
	// Retries is how often a run is repeated when L1 itself died (powered
	// off, crashed or never started the command) rather than the command
	// failing; default 1, negative for none.
	Retries int
	// Stdout receives the command's output (stdout and stderr interleaved)
	// as it is produced; nil discards it.
	Stdout io.Writer
	// Log receives the harness's own lines ("lab: ..."); nil discards them.
	Log io.Writer
	// CacheDir is guestimg's cache, where the L1 image and the last run's
	// console log live; default guestimg.DefaultCacheDir().
	CacheDir string
	// QEMU is the emulator: a path, QEMUBackports, QEMUSystem, or ""
	// (QEMUAuto: bookworm-backports' on a Debian 12 host, falling back to
	// the system's when it cannot be fetched; elsewhere
	// qemu-system-x86_64 from PATH).
	QEMU string
	// qemuDataDirs (-L each) and qemuEnv go with QEMUBackports' QEMU.
	qemuDataDirs []string
	qemuEnv      []string

	// bootLimit is how long after QEMU's start L1 may take to start the
	// command before the harness takes it for stuck at boot; default
	// bootLimit (tests shorten it).
	bootLimit time.Duration
}

// Error is a run that failed in the lab itself, not in the command: L1
// did not boot, could not mount the host, had no /dev/kvm, died, or timed
// out. Console holds the tail of L1's kernel console.
type Error struct {
	Reason  string
	Console string // last lines of L1's console
	Log     string // path of the whole console log
	Err     error  // ErrTimeout, or nil
}

func (e *Error) Error() string {
	return fmt.Sprintf("lab: %s (L1 console: %s)\n--- last lines of L1's console ---\n%s", e.Reason, e.Log, e.Console)
}

func (e *Error) Unwrap() error { return e.Err }

// died reports whether the run may be repeated: L1 went away without
// saying why (not a timeout, not a setup failure it reported).
func (e *Error) died() bool { return e.Err == nil && strings.HasPrefix(e.Reason, "L1 ended") }

// Run boots L1, runs cfg.Command in it and returns the command's exit
// status. The error is non-nil only when the lab could not run the command
// to its end (an *Error, or a setup error such as ErrNoQEMU): a failing
// command is a non-zero status and a nil error.
func Run(ctx context.Context, cfg Config) (int, error) {
	if len(cfg.Command) == 0 {
		return 0, errors.New("lab: no command")
	}
	asked := cfg.QEMU
	switch asked {
	case QEMUAuto, QEMUBackports, QEMUSystem:
		cfg.QEMU = ""
	}
	if err := cfg.fill(); err != nil {
		return 0, err
	}
	if err := cfg.useLabQEMU(ctx, asked); err != nil {
		return 0, err
	}
	img, err := guestimg.BuildLab(ctx, guestimg.Options{CacheDir: cfg.CacheDir, Log: cfg.Log})
	if err != nil {
		return 0, err
	}
	// L1s side by side only while each vCPU has a host CPU of its own:
	// sharing cores, they would share the timings the tests inside rely
	// on (failure detection) too. ShareCPUs is for L1s that keep one
	// vCPU busy each (scripts/guest-tests.sh: two of them on two CPUs).
	if !cfg.ShareCPUs {
		unlock, err := lockCPUs(ctx, filepath.Join(cfg.CacheDir, "lab"), cfg.CPUs, runtime.NumCPU(), cfg.Log)
		if err != nil {
			return 0, err
		}
		defer unlock()
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		status, err := runOnce(ctx, cfg, img)
		var le *Error
		if errors.As(err, &le) && le.died() && attempt < cfg.Retries && ctx.Err() == nil {
			// Keep the dead L1's whole console: the next run overwrites
			// console.log.
			kept := filepath.Join(cfg.CacheDir, "lab", fmt.Sprintf("console.failed-%s-%d-%d.log", time.Now().Format("150405"), os.Getpid(), attempt+1))
			if os.Rename(le.Log, kept) != nil {
				kept = le.Log
			}
			fmt.Fprintf(cfg.Log, "lab: %s; L1 itself failed, not the command: running it again (%d of %d retries); its console: %s\n--- last lines of L1's console ---\n%s\n",
				le.Reason, attempt+1, cfg.Retries, kept, le.Console)
			continue
		}
		return status, err
	}
}

// Config.QEMU's names for a QEMU (govmm lab --qemu NAME):
//   - QEMUBackports asks for the QEMU of Debian's bookworm-backports
//     (guestimg.LabQEMU) on a Debian 12 host, fetched into the cache the
//     first time, instead of the system's 7.2, and fails where it cannot
//     have it;
//   - QEMUSystem asks for qemu-system-x86_64 from PATH;
//   - QEMUAuto (the default) is QEMUBackports on a Debian 12 host, and
//     QEMUSystem elsewhere or when the fetch fails (said in the log; the
//     failure is remembered for an hour, guestimg.LabQEMURetryAfter,
//     where QEMUBackports fetches again).
//
// docs/ARCHITECTURE.md, "The lab", "Which QEMU", says why.
const (
	QEMUAuto      = ""
	QEMUBackports = "backports"
	QEMUSystem    = "system"
)

// useLabQEMU puts bookworm-backports' QEMU (guestimg.LabQEMU) in place
// of the system's where asked (QEMUBackports, QEMUAuto), fetching it
// the first time.
func (cfg *Config) useLabQEMU(ctx context.Context, asked string) error {
	if asked != QEMUAuto && asked != QEMUBackports {
		return nil
	}
	// Asked for by name, the backport is fetched again even if the last
	// fetch failed within the hour; the default takes the failure as
	// remembered, so that an offline host does not wait for apt-get's
	// retries at every L1 boot.
	e, err := guestimg.LabQEMU(ctx, guestimg.Options{CacheDir: cfg.CacheDir, Log: cfg.Log}, asked == QEMUBackports)
	switch {
	case err == nil:
	case asked == QEMUBackports:
		return fmt.Errorf("lab: --qemu %s: %w", QEMUBackports, err)
	case errors.Is(err, guestimg.ErrLabQEMUNotNeeded):
		return nil // not Debian 12: the system's QEMU is the one
	case ctx.Err() != nil:
		return ctx.Err()
	default:
		fmt.Fprintf(cfg.Log, "lab: no QEMU from %s (%v): L1 runs under the system's %s instead, with its faults (docs/ARCHITECTURE.md, \"Which QEMU\")\n",
			guestimg.LabQEMUSuite, err, cfg.QEMU)
		return nil
	}
	cfg.QEMU, cfg.qemuDataDirs, cfg.qemuEnv = e.Binary, e.DataDirs, e.Env
	fmt.Fprintf(cfg.Log, "lab: QEMU %s from %s\n", e.Version, e.Suite)
	return nil
}

// fill checks cfg and sets its defaults (the QEMU found in PATH, this
// directory, this host's CPUs up to 4, 8 GiB, multi-threaded TCG, an hour,
// one retry, bootLimit, shares made absolute).
func (cfg *Config) fill() error {
	if cfg.QEMU == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return ErrNoQEMU
		}
		cfg.QEMU = p
	} else if _, err := exec.LookPath(cfg.QEMU); err != nil {
		return fmt.Errorf("lab: %s: %w", cfg.QEMU, ErrNoQEMU)
	}
	if cfg.Dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		cfg.Dir = wd
	}
	if cfg.CPUs <= 0 {
		cfg.CPUs = min(runtime.NumCPU(), 4)
	}
	if cfg.MemMiB <= 0 {
		cfg.MemMiB = 8192
	}
	switch {
	case cfg.Pin == "" && cfg.CPUs > 1:
		cfg.Pin = "0"
	case cfg.Pin == "" || cfg.Pin == "all":
		cfg.Pin = ""
	case strings.Trim(cfg.Pin, "0123456789,-") != "":
		return fmt.Errorf("lab: CPU list %q: want e.g. 0, 0-1 or 0,2 (L1's CPUs), or all", cfg.Pin)
	}
	switch {
	case cfg.CPUModel == "":
		cfg.CPUModel = DefaultCPUModel
	case strings.ContainsAny(cfg.CPUModel, " \t\n"):
		return fmt.Errorf("lab: CPU model %q: one word, as QEMU's -cpu takes it (e.g. %s)", cfg.CPUModel, DefaultCPUModel)
	}
	switch cfg.TCG {
	case "":
		cfg.TCG = "multi"
	case "multi", "single":
	default:
		return fmt.Errorf("lab: TCG threading %q: multi or single", cfg.TCG)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 60 * time.Minute
	}
	if cfg.Retries == 0 {
		cfg.Retries = 1
	}
	if cfg.bootLimit <= 0 {
		cfg.bootLimit = bootLimit
	}
	if cfg.Stdout == nil {
		cfg.Stdout = io.Discard
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.CacheDir == "" {
		cfg.CacheDir = guestimg.DefaultCacheDir()
	}
	for i, s := range cfg.Shares {
		abs, err := filepath.Abs(s)
		if err != nil {
			return fmt.Errorf("lab: share %s: %w", s, err)
		}
		if fi, err := os.Stat(abs); err != nil || !fi.IsDir() {
			return fmt.Errorf("lab: share %s: not a directory", s)
		}
		cfg.Shares[i] = abs
	}
	return nil
}

// runOnce is one boot of L1. (Long, on purpose: it reads as L1's life in
// order, the control files, the output socket, QEMU, the wait, and what
// its end means, all sharing the control directory, the console log and
// the start time.)
func runOnce(ctx context.Context, cfg Config, img guestimg.Image) (int, error) {
	ctl, err := os.MkdirTemp("", "govmm-lab-")
	if err != nil {
		return 0, fmt.Errorf("lab: %w", err)
	}
	defer os.RemoveAll(ctl)
	if err := os.WriteFile(filepath.Join(ctl, "cmd.sh"), commandScript(cfg), 0o644); err != nil {
		return 0, fmt.Errorf("lab: %w", err)
	}
	var shares strings.Builder
	for i, s := range cfg.Shares {
		fmt.Fprintf(&shares, "share%d %s\n", i, s)
	}
	if err := os.WriteFile(filepath.Join(ctl, "shares"), []byte(shares.String()), 0o644); err != nil {
		return 0, fmt.Errorf("lab: %w", err)
	}
	if cfg.TraceKVM {
		if err := os.WriteFile(filepath.Join(ctl, "trace-kvm"), nil, 0o644); err != nil {
			return 0, fmt.Errorf("lab: %w", err)
		}
	}

	// The command's output arrives on a unix socket that QEMU connects to
	// (a virtio console port in L1).
	sock := filepath.Join(ctl, "out.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return 0, fmt.Errorf("lab: %w", err)
	}
	defer ln.Close()
	// L1's console goes to a file in ctl while it runs and is kept as
	// <cache>/lab/console.log afterwards (the last run's, for a reader).
	consoleLog := filepath.Join(ctl, "console.log")
	defer keepConsole(consoleLog, filepath.Join(cfg.CacheDir, "lab", "console.log"))

	args := qemuArgs(cfg, img, ctl, sock, consoleLog)
	cmd := exec.Command(cfg.QEMU, args...)
	if len(cfg.qemuEnv) > 0 {
		cmd.Env = append(os.Environ(), cfg.qemuEnv...)
	}
	var qemuOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &qemuOut, &qemuOut
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("lab: start %s: %w", cfg.QEMU, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	copied := make(chan struct{})
	go func() {
		defer close(copied)
		ln.SetDeadline(time.Now().Add(time.Minute))
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(cfg.Stdout, c)
	}()

	var waitErr error
	var why string // what stuck says, when L1 is killed for it
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for running := true; running; {
		select {
		case waitErr = <-exited:
			running = false
			continue
		case <-tick.C:
			why = stuck(ctl, time.Since(start), cfg.bootLimit)
			if why == "" {
				continue
			}
		case <-ctx.Done():
			return 0, killedAtDeadline(ctx, cfg, cmd, exited, ln, copied, ctl, consoleLog, start)
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		ln.Close()
		<-copied
		return 0, &Error{Reason: fmt.Sprintf("L1 ended by the harness: %s (after %v)", why, time.Since(start).Round(time.Second)),
			Console: tail(consoleLog, 40), Log: filepath.Join(cfg.CacheDir, "lab", "console.log")}
	}
	ln.Close()
	<-copied

	if b, err := os.ReadFile(filepath.Join(ctl, "status")); err == nil {
		status, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return 0, &Error{Reason: fmt.Sprintf("bad status file %q", b), Console: tail(consoleLog, 40), Log: filepath.Join(cfg.CacheDir, "lab", "console.log")}
		}
		fmt.Fprintf(cfg.Log, "lab: command exited with status %d after %v in L1\n", status, time.Since(start).Round(100*time.Millisecond))
		return status, nil
	}
	if b, err := os.ReadFile(filepath.Join(ctl, "error")); err == nil {
		return 0, &Error{Reason: strings.TrimSpace(string(b)), Console: tail(consoleLog, 40), Log: filepath.Join(cfg.CacheDir, "lab", "console.log")}
	}
	reason := "L1 ended before it started the command"
	if _, err := os.Stat(filepath.Join(ctl, "started")); err == nil {
		reason = "L1 ended while the command ran, without its exit status"
	}
	if waitErr != nil {
		reason += fmt.Sprintf(" (qemu: %v: %s)", waitErr, strings.TrimSpace(qemuOut.String()))
	}
	return 0, &Error{Reason: reason, Console: tail(consoleLog, 40), Log: filepath.Join(cfg.CacheDir, "lab", "console.log")}
}

// killedAtDeadline kills L1 when ctx ends (the timeout, or the caller
// gave up) and says so.
func killedAtDeadline(ctx context.Context, cfg Config, cmd *exec.Cmd, exited <-chan error, ln net.Listener, copied <-chan struct{}, ctl, consoleLog string, start time.Time) error {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-exited
	ln.Close()
	<-copied
	reason := fmt.Sprintf("timed out after %v", time.Since(start).Round(time.Second))
	if _, err := os.Stat(filepath.Join(ctl, "started")); err == nil {
		reason = fmt.Sprintf("command still running after %v (timeout %v); L1 killed", time.Since(start).Round(time.Second), cfg.Timeout)
	}
	cause := fmt.Errorf("%w: %w", ErrTimeout, ctx.Err())
	if errors.Is(ctx.Err(), context.Canceled) {
		reason = fmt.Sprintf("interrupted after %v; L1 killed", time.Since(start).Round(time.Second))
		cause = ctx.Err()
	}
	return &Error{Reason: reason, Console: tail(consoleLog, 40), Log: filepath.Join(cfg.CacheDir, "lab", "console.log"), Err: cause}
}

// heartbeatLimit is how long L1's heartbeat (labinit.sh touches it every
// 5 s while the command runs) may stand still before the harness takes
// L1 for wedged: QEMU's emulation has stopped every process in L1 at once,
// without a panic, for good (seen with 1 and with 2 vCPUs).
const heartbeatLimit = 2 * time.Minute

// wedged says whether the heartbeat file exists and is older than
// heartbeatLimit.
func wedged(heartbeat string) bool {
	fi, err := os.Stat(heartbeat)
	return err == nil && time.Since(fi.ModTime()) > heartbeatLimit
}

// bootLimit is how long L1 may take from QEMU's start to the command's
// before the harness takes it for stuck at boot. L1 reports reaching it
// 3.4-8.1 s after its kernel started (127 runs, 2026-11-30..12-04, two
// L1s sharing two CPUs); a CI run's L1 had not reached it after 60 s,
// its console empty, while the same package's other L1s booted at the
// usual speed: a boot that hangs, which without this limit would hold a
// run until its whole timeout (30 min in make test).
const bootLimit = 3 * time.Minute

// stuck says why L1 should be killed, or "" while it seems alive: the
// command has not started within limit of QEMU's start (elapsed), or its
// heartbeat stopped.
func stuck(ctl string, elapsed, limit time.Duration) string {
	if _, err := os.Stat(filepath.Join(ctl, "started")); err != nil && elapsed > limit {
		return fmt.Sprintf("the command had not started %v after QEMU did (L1 reaches it in seconds), L1 stuck at boot", limit)
	}
	if wedged(filepath.Join(ctl, "heartbeat")) {
		return fmt.Sprintf("no heartbeat for %v, L1 wedged", heartbeatLimit)
	}
	return ""
}

// DefaultCPUModel is L1's CPU: QEMU's TCG "max" model (it has SVM with
// nested paging, which is what kvm_amd needs) as an AMD family 0x1a
// (Zen 5) part. Left alone, "max" says AMD family 0xf (K8, 2003), and
// Linux runs K8-only code for it in L1 and in every guest, which inherits
// the family: at boot the GART aperture search reads the config space of
// every slot on all 256 PCI buses, twice, each read a port exit (4-7 s
// of a plain-command-line boot of the default guest in the lab, under
// govmm and QEMU alike; hardware of this decade never does it).
// Family 0x17 or 0x19 would bring Linux's return-thunk mitigations
// (retbleed's untrained return thunk, SRSO's safe RET) to every function
// return in L1 and in its guests; for 0x1a it applies none.
// docs/ARCHITECTURE.md, "The lab".
const DefaultCPUModel = "max,family=26,model=1"

// qemuArgs is L1's command line: TCG with one thread per vCPU (by
// default), the CPU model cfg.CPUModel. The
// host's / is a read-only 9p share (multidevs=remap: it spans several
// file systems), the control directory and cfg.Shares writable ones.
func qemuArgs(cfg Config, img guestimg.Image, ctl, sock, consoleLog string) []string {
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
	}
	for _, d := range cfg.qemuDataDirs {
		args = append(args, "-L", d)
	}
	args = append(args,
		"-accel", "tcg,thread="+cfg.TCG,
		"-cpu", cfg.CPUModel,
		"-smp", strconv.Itoa(cfg.CPUs),
		"-m", strconv.Itoa(cfg.MemMiB),
		"-kernel", img.Kernel,
		"-initrd", img.Initrd,
		// softlockup_panic, panic_on_rcu_stall: an L1 whose CPU is stuck
		// (seen under QEMU's emulated SVM: a soft lockup, or a CPU that
		// stops taking timer interrupts) dies at once, and the run is
		// retried, rather than hanging until the timeout.
		"-append", "console=ttyS0 panic=-1 softlockup_panic=1 sysctl.kernel.panic_on_rcu_stall=1 quiet loglevel=4",
		"-chardev", "file,id=console,path="+consoleLog,
		"-serial", "chardev:console",
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
		"-virtfs", "local,path="+ctl+",mount_tag=labctl,security_model=none",
		"-device", "virtio-serial-pci",
		"-chardev", "socket,id=out,path="+sock,
		"-device", "virtserialport,chardev=out,name=govmm.out",
	)
	for i, s := range cfg.Shares {
		args = append(args, "-virtfs", fmt.Sprintf("local,path=%s,mount_tag=share%d,security_model=none,multidevs=remap", s, i))
	}
	return args
}

// passEnv are the host variables the command inherits.
func passEnv(name string) bool {
	switch name {
	case "PATH", "HOME", "TERM", "USER", "LANG":
		return true
	}
	return strings.HasPrefix(name, "GO") || strings.HasPrefix(name, "CGO_")
}

// commandScript renders cfg as a script for the host's /bin/sh inside L1.
func commandScript(cfg Config) []byte {
	var b strings.Builder
	b.WriteString("# written by govmm's lab harness\n")
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if passEnv(name) {
			fmt.Fprintf(&b, "export %s\n", shellQuote(kv))
		}
	}
	for _, kv := range cfg.Env {
		fmt.Fprintf(&b, "export %s\n", shellQuote(kv))
	}
	b.WriteString("export GOVMM_LAB=1\n")
	fmt.Fprintf(&b, "cd %s || exit 126\n", shellQuote(cfg.Dir))
	if len(cfg.Holder) > 0 {
		// Started first, waited for (up to 30 s) until it says it holds.
		b.WriteString("hold=$(mktemp)\n")
		b.WriteString(shellArgs(cfg.Holder) + " >\"$hold\" </dev/null &\n")
		b.WriteString("i=0; while [ ! -s \"$hold\" ] && kill -0 $! 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n")
		b.WriteString("[ -s \"$hold\" ] || echo \"lab: the VM holder did not start (L1 rewrites its code as VMs come and go)\" >&2\n")
	}
	b.WriteString("exec")
	if cfg.Pin != "" {
		// taskset is util-linux's, an essential package on Debian and
		// Ubuntu; L1 runs the host's.
		fmt.Fprintf(&b, " taskset -c %s", shellQuote(cfg.Pin))
	}
	b.WriteString(" " + shellArgs(cfg.Command) + "\n")
	return []byte(b.String())
}

// shellArgs quotes an argv for sh, space-separated.
func shellArgs(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}

// shellQuote quotes s for sh in single quotes.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// lockCPUs holds n of this host's CPUs for an L1 of n vCPUs, waiting as
// long as ctx allows and saying once that it waits: one flock per CPU, on
// dir/cpu-<i>.lock for i < cpus, all n taken at once or none (an L1 with
// more vCPUs than the host has CPUs takes them all). So L1s run side by
// side as long as their vCPUs fit the host's CPUs, across processes.
// Waiters poll: who polls first when CPUs free up wins.
func lockCPUs(ctx context.Context, dir string, n, cpus int, log io.Writer) (func(), error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	n = max(1, min(n, cpus))
	files := make([]*os.File, cpus)
	closeAll := func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}
	for i := range files {
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("cpu-%d.lock", i)), os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("lab: %w", err)
		}
		files[i] = f
	}
	for said := false; ; {
		var held []*os.File
		for _, f := range files {
			err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
			if err == nil {
				held = append(held, f)
				if len(held) == n {
					break
				}
			} else if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
				closeAll()
				return nil, fmt.Errorf("lab: lock %s: %w", f.Name(), err)
			}
		}
		if len(held) == n {
			return closeAll, nil
		}
		for _, f := range held {
			_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		}
		if !said {
			fmt.Fprintf(log, "lab: waiting for %d of this host's %d CPUs, held by other lab runs (%s)\n", n, cpus, dir)
			said = true
		}
		select {
		case <-ctx.Done():
			closeAll()
			return nil, fmt.Errorf("lab: waiting for CPUs: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// keepConsole copies the console log to where it outlives the run.
func keepConsole(from, to string) {
	if b, err := os.ReadFile(from); err == nil {
		_ = os.MkdirAll(filepath.Dir(to), 0o755)
		_ = os.WriteFile(to+".tmp", b, 0o644)
		_ = os.Rename(to+".tmp", to)
	}
}

// tail returns the last n lines of a file, or a note that it is missing.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
