// Command init is /init, PID 1 of the default govmm guest, and the guest's
// only Go binary: called as govmm-demo or govmm-dirtier (the symbolic
// links /bin/govmm-demo and /bin/govmm-dirtier point at /init) it runs
// that program instead (packages guestimg/guest/demo and
// guestimg/guest/dirtier). One static binary instead of three keeps the
// initramfs small: the Go runtime and the standard library are in it once.
//
// It mounts the pseudo file systems, loads the kernel modules listed in
// /etc/govmm/modules, configures eth0 from govmm.ip= and govmm.gw= on the
// kernel command line, mounts the virtio disk at /data (formatting it as
// ext4 when it is blank), starts the demo HTTP service on port 80 and keeps
// it running, then either
//
//   - command mode (/govmm/cmd exists): runs that argv on the console with
//     byte-exact output, under /init itself re-executed as the session
//     leader (runSession: it drains the console before the session ends,
//     so no output is lost), and reports its exit status as one byte
//     written to I/O port 0x600; or
//   - interactive mode: prints the boot trace line (guestproto.BootTraceLine:
//     when the kernel unpacked the initramfs and started /init, from the
//     kernel log), then "govmm-guest: ready", and runs a shell on the
//     console, respawning it.
//
// It is the only reaper of processes in the guest: every child is started
// through initProc.spawn, and one goroutine collects exit statuses with
// wait4(-1). os/exec's Wait is never used, as it would race with it.
//
// busybox poweroff (SIGUSR2) and halt (SIGUSR1) stop everything, unmount
// /data and write 0 to port 0x600; busybox reboot (SIGTERM) does the same
// and then resets the machine.
package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"govmm/guestimg/guest/demo"
	"govmm/guestimg/guest/dirtier"
	"govmm/guestimg/internal/guestproto"
)

const (
	pathEnv  = "PATH=/bin:/sbin:/usr/bin:/usr/sbin"
	demoPort = 80
)

// initProc is PID 1's state.
type initProc struct {
	start   time.Time
	cfg     bootConfig
	cmdMode bool
	console *os.File // /dev/console as the kernel opened it for us

	mu      sync.Mutex // guards waiters; held across fork and registration
	waiters map[int]chan syscall.WaitStatus

	stopping atomic.Bool // set once shutdown starts: no more respawns
	finish   sync.Once

	kernelLog func(level int, msg string) // logKernelAt; tests replace it
}

// programs are the other programs of the multi-call binary, by the
// name it is called as.
var programs = map[string]func(args []string) int{
	"govmm-demo":    demo.Main,
	"govmm-dirtier": dirtier.Main,
}

func main() {
	if prog, ok := programs[filepath.Base(os.Args[0])]; ok {
		os.Exit(prog(os.Args[1:]))
	}
	if len(os.Args) > 1 && os.Args[0] == sessionArgv0 {
		os.Exit(runSession(os.Args[1:]))
	}
	in := &initProc{start: time.Now(), console: os.Stdout, waiters: map[int]chan syscall.WaitStatus{}, kernelLog: logKernelAt}
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "govmm-init: must run as PID 1 (the guest's /init)")
		os.Exit(2)
	}
	// PID 1 gets only the signals it handles. Go's default action for
	// these would exit the process, and PID 1 must never exit.
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGPIPE, syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU)
	chld := make(chan os.Signal, 1)
	signal.Notify(chld, syscall.SIGCHLD)
	ctl := make(chan os.Signal, 4)
	signal.Notify(ctl, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGTERM)
	go in.reap(chld)

	os.Setenv("PATH", strings.TrimPrefix(pathEnv, "PATH="))
	os.Setenv("HOME", "/root")
	_, err := os.Stat(guestproto.CommandPath)
	in.cmdMode = err == nil

	in.mountAll()
	if in.cmdMode {
		// Keep kernel messages (below KERN_ALERT) off the console so the
		// command's output is byte-exact.
		_ = os.WriteFile("/proc/sys/kernel/printk", []byte("2"), 0)
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	var warns []error
	in.cfg, warns = parseCmdline(string(cmdline))
	for _, w := range warns {
		in.errorf("kernel command line: %v", w)
	}
	in.debugf("mounted")
	_ = syscall.Sethostname([]byte("govmm"))
	in.loadModules()
	in.debugf("modules loaded")
	in.setupNetwork()
	in.debugf("network up")

	in.startDemo()

	if in.cmdMode {
		go in.runCommand()
	} else {
		if line, err := bootTraceLine(); err == nil {
			fmt.Fprintf(in.console, "%s\n", line)
		} else {
			in.errorf("boot trace: %v", err)
		}
		fmt.Fprintf(in.console, "%s\n", guestproto.ReadyLine)
		go in.shellLoop()
	}
	for s := range ctl {
		switch s {
		case syscall.SIGUSR1, syscall.SIGUSR2:
			go in.shutdown(actPowerOff, 0)
		case syscall.SIGTERM:
			go in.shutdown(actReboot, 0)
		}
	}
}

// startDemo prepares the data disk and starts the demo service, whose log
// lives on the disk when it is there and writable, in /tmp otherwise, and
// waits until the service listens.
func (in *initProc) startDemo() {
	logPath := filepath.Join(dataDir, "log.txt")
	switch writable, err := in.setupDisk(); {
	case errors.Is(err, errNoDisk):
		logPath = "/tmp/log.txt"
		in.say("no disk: the demo log is %s and does not survive a reboot", logPath)
	case err != nil:
		logPath = "/tmp/log.txt"
		in.errorf("disk: %v; the demo log is %s", err, logPath)
	case !writable:
		logPath = "/tmp/log.txt"
		in.say("the demo log is %s", logPath)
	}
	in.debugf("disk ready")
	go in.superviseDemo(logPath)
	// Ready means the demo service answers: a client told so connects
	// at once. A guest starved of CPU (a replicated guest in the lab) can
	// take long; say so, and go on waiting.
	if err := waitListening(demoPort, 3*time.Second); err != nil {
		in.slowf("demo service: %v; waiting up to %v more", err, demoPatience)
		if err := waitListening(demoPort, demoPatience); err != nil {
			in.errorf("demo service: %v", err)
		}
	}
	in.debugf("demo listening")
}

// say prints an informational line, except in command mode.
func (in *initProc) say(format string, args ...any) {
	if !in.cmdMode {
		fmt.Fprintf(in.console, "govmm-init: "+format+"\n", args...)
	}
}

// slowf tells of a step that takes longer than it should (a guest
// starved of CPU, as in the lab) and goes on: on the console, except in
// command mode, whose console carries the command's bytes alone; there
// it goes to the kernel log at KERN_WARNING, below command mode's console
// level, so that dmesg has it.
func (in *initProc) slowf(format string, args ...any) {
	msg := fmt.Sprintf("govmm-init: "+format, args...)
	if in.cmdMode {
		in.kernelLog(4, msg)
		return
	}
	fmt.Fprintln(in.console, msg)
}

// errorf prints a problem, in every mode.
func (in *initProc) errorf(format string, args ...any) {
	fmt.Fprintf(in.console, "govmm-init: "+format+"\n", args...)
}

// debugf prints the time since boot when govmm.debug is set.
func (in *initProc) debugf(format string, args ...any) {
	if in.cfg.Debug {
		fmt.Fprintf(in.console, "govmm-init: %8.3fms "+format+"\n",
			append([]any{float64(time.Since(in.start).Microseconds()) / 1000}, args...)...)
	}
}

func (in *initProc) setupNetwork() {
	if err := in.runQuiet("ip", "link", "set", "lo", "up"); err != nil {
		in.errorf("lo: %v", err)
	}
	if !in.cfg.IP.IsValid() {
		return
	}
	if !pciHas(virtioNetIDs) || !waitFor("/sys/class/net/eth0", 2*time.Second) {
		in.say("govmm.ip=%s given but there is no eth0", in.cfg.IP)
		return
	}
	steps := [][]string{
		{"ip", "addr", "add", in.cfg.IP.String(), "dev", "eth0"},
		{"ip", "link", "set", "eth0", "up"},
	}
	if in.cfg.GW.IsValid() {
		steps = append(steps, []string{"ip", "route", "add", "default", "via", in.cfg.GW.String(), "dev", "eth0"})
	}
	for _, s := range steps {
		if err := in.runQuiet(s...); err != nil {
			in.errorf("eth0: %v", err)
			return
		}
	}
}

// demoPatience is how much longer than its first 3 s the init waits for
// the demo service before it says ready anyway.
const demoPatience = 5 * time.Minute

// waitListening waits until something accepts TCP connections on port.
func waitListening(port int, d time.Duration) error {
	deadline := time.Now().Add(d)
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for {
		c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listening on %s after %v: %w", addr, d, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// superviseDemo runs the demo service and restarts it when it dies.
func (in *initProc) superviseDemo(logPath string) {
	argv := []string{"/bin/govmm-demo", "--addr", fmt.Sprintf(":%d", demoPort), "--log", logPath}
	for !in.stopping.Load() {
		started := time.Now()
		out := "/dev/console"
		if in.cmdMode {
			out = "/dev/null"
		}
		pid, done, err := in.spawnOn(argv, out, false)
		if err != nil {
			in.errorf("start demo service: %v", err)
		} else {
			ws := <-done
			if in.stopping.Load() {
				return
			}
			in.errorf("demo service (pid %d) %s; restarting", pid, describe(ws))
		}
		if time.Since(started) < time.Second {
			time.Sleep(time.Second)
		}
	}
}

// shellLoop runs an interactive shell on the console, forever.
func (in *initProc) shellLoop() {
	for !in.stopping.Load() {
		started := time.Now()
		_, done, err := in.spawnOn([]string{"-sh"}, "/dev/console", true)
		if err != nil {
			in.errorf("start shell: %v", err)
		} else {
			<-done
		}
		if time.Since(started) < time.Second {
			time.Sleep(time.Second)
		}
	}
}

// runCommand runs the argv of /govmm/cmd as command mode's one job, under
// a session leader that drains the console before the session ends (see
// runSession).
func (in *initProc) runCommand() {
	b, err := os.ReadFile(guestproto.CommandPath)
	argv := parseCommand(b)
	if err != nil || len(argv) == 0 {
		in.errorf("read %s: %v (%d arguments)", guestproto.CommandPath, err, len(argv))
		in.shutdown(actExit, 127)
		return
	}
	if err := setRawOutput("/dev/console"); err != nil {
		in.errorf("console: %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		self = "/init"
	}
	_, done, err := in.spawnPathOn(self, append([]string{sessionArgv0}, argv...), "/dev/console", true)
	if err != nil {
		in.errorf("run %s: %v", argv[0], err)
		in.shutdown(actExit, 127)
		return
	}
	in.shutdown(actExit, exitStatus(<-done))
}

// parseCommand splits the NUL-terminated arguments of /govmm/cmd.
// Empty arguments survive; an empty file is no command.
func parseCommand(b []byte) []string {
	if len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

// exitStatus is the shell's convention: the exit code, or 128+N when
// killed by signal N.
func exitStatus(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus() & 0xff
}

func describe(ws syscall.WaitStatus) string {
	if ws.Signaled() {
		return fmt.Sprintf("was killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
	}
	return fmt.Sprintf("exited with status %d", ws.ExitStatus())
}

type action int

const (
	actPowerOff action = iota // busybox poweroff or halt
	actReboot                 // busybox reboot
	actExit                   // command mode's command finished
)

// shutdown stops every process, unmounts /data and ends the machine. Only
// the first call does anything; it never returns.
func (in *initProc) shutdown(a action, status int) {
	in.finish.Do(func() {
		in.stopping.Store(true)
		// What was printed so far goes out before anyone is killed: the
		// death of a session leader on the console (a shell, command
		// mode's session) would discard what the UART has not sent.
		console := int(in.console.Fd())
		stalled := drainTTY(console)
		killAll()
		if err := unmountData(); err != nil {
			in.errorf("%v", err)
		}
		if stalled == nil {
			stalled = drainTTY(console)
		}
		if stalled != nil {
			// Said where it may still be read: the console is what stalled.
			logKernel("govmm-init: " + stalled.Error())
		}
		switch a {
		case actReboot:
			if in.cmdMode {
				// The kernel would print "reboot: Restarting system", an
				// emergency message no console level holds back. Command
				// mode's output is the command's own: pulse the reset line
				// ourselves, as the kernel does with reboot=k.
				if err := pulseResetLine(); err != nil {
					in.errorf("reset through the i8042: %v", err)
				}
			}
			// The kernel runs with reboot=k: the VMM sees the i8042 reset.
			err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_RESTART)
			in.errorf("reboot: %v", err)
		default:
			if err := writeExitPort(byte(status)); err != nil {
				in.errorf("report exit status %d on port %#x: %v; powering off", status, guestproto.ExitPort, err)
			}
			// A VMM that handles the port never gets here.
			err := syscall.Reboot(syscall.LINUX_REBOOT_CMD_POWER_OFF)
			in.errorf("power off: %v", err)
		}
	})
	select {}
}

// killAll sends SIGTERM to every other process, waits up to a second for
// them to go, then sends SIGKILL.
func killAll() {
	_ = syscall.Kill(-1, syscall.SIGTERM)
	deadline := time.Now().Add(time.Second)
	for otherProcesses() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if otherProcesses() == 0 {
		return
	}
	_ = syscall.Kill(-1, syscall.SIGKILL)
	deadline = time.Now().Add(500 * time.Millisecond)
	for otherProcesses() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// otherProcesses counts user processes other than init: kernel threads
// (pid 2 and its children) do not count.
func otherProcesses() int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 2 {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may hold spaces and parentheses.
		s := string(stat)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) >= 2 && f[1] == "2" {
			continue
		}
		n++
	}
	return n
}

// reap collects every child's exit status and hands it to whoever spawned
// it. Orphans reparented to init are reaped and dropped.
func (in *initProc) reap(chld <-chan os.Signal) {
	for range chld {
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
			in.mu.Lock()
			ch := in.waiters[pid]
			delete(in.waiters, pid)
			in.mu.Unlock()
			if ch != nil {
				ch <- ws
			}
		}
	}
}

// spawnOn starts argv with stdin, stdout and stderr on the file tty. With
// ctty it gets its own session with tty as controlling terminal (job
// control). argv[0] may start with "-" for a login shell.
func (in *initProc) spawnOn(argv []string, tty string, ctty bool) (int, <-chan syscall.WaitStatus, error) {
	path, err := lookPath(strings.TrimPrefix(argv[0], "-"))
	if err != nil {
		return 0, nil, err
	}
	return in.spawnPathOn(path, argv, tty, ctty)
}

func (in *initProc) spawnPathOn(path string, argv []string, tty string, ctty bool) (int, <-chan syscall.WaitStatus, error) {
	fd, err := syscall.Open(tty, syscall.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return 0, nil, err
	}
	defer syscall.Close(fd)
	attr := &syscall.ProcAttr{
		Dir:   "/",
		Env:   []string{pathEnv, "HOME=/root", "TERM=linux", "SHELL=/bin/sh", "USER=root"},
		Files: []uintptr{uintptr(fd), uintptr(fd), uintptr(fd)},
		Sys:   &syscall.SysProcAttr{Setsid: true, Setctty: ctty, Ctty: 0},
	}
	return in.spawnPath(path, argv, attr)
}

// runQuiet runs argv to completion with output discarded, except that
// stderr is reported in the error when it fails.
func (in *initProc) runQuiet(argv ...string) error {
	errFile, err := os.CreateTemp("/tmp", "init-stderr-")
	if err != nil {
		return err
	}
	defer os.Remove(errFile.Name())
	defer errFile.Close()
	null, err := os.OpenFile("/dev/null", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer null.Close()
	attr := &syscall.ProcAttr{
		Dir:   "/",
		Env:   []string{pathEnv, "HOME=/root"},
		Files: []uintptr{null.Fd(), null.Fd(), errFile.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	}
	_, done, err := in.spawn(argv, attr)
	if err != nil {
		return fmt.Errorf("%s: %w", argv[0], err)
	}
	ws := <-done
	if ws.Exited() && ws.ExitStatus() == 0 {
		return nil
	}
	msg, _ := os.ReadFile(errFile.Name())
	return fmt.Errorf("%s %s: %s", strings.Join(argv, " "), describe(ws), strings.TrimSpace(string(msg)))
}

// spawn starts a child and registers it with the reaper. The lock is held
// from fork to registration so that a child exiting at once is not missed.
// argv[0] is looked up in the guest's PATH, minus a leading "-" (a login
// shell), unless path is given.
func (in *initProc) spawn(argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	path, err := lookPath(strings.TrimPrefix(argv[0], "-"))
	if err != nil {
		return 0, nil, err
	}
	return in.spawnPath(path, argv, attr)
}

func (in *initProc) spawnPath(path string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	in.mu.Lock()
	defer in.mu.Unlock()
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	in.waiters[pid] = ch
	return pid, ch, nil
}

// lookPath finds name in the guest's PATH (a name with a slash is taken
// as it is).
func lookPath(name string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin"} {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return filepath.Join(dir, name), nil
		}
	}
	return "", fmt.Errorf("%s: %w", name, syscall.ENOENT)
}
