package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

// ptyShell is an interactive bash with job control on a new pseudo
// terminal, as a user's login shell would be.
type ptyShell struct {
	master *os.File
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
}

func newPTYShell(t *testing.T) *ptyShell {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skipf("needs bash for an interactive shell with job control: %v", err)
	}
	mfd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	require.NoError(t, err)
	master := os.NewFile(uintptr(mfd), "/dev/ptmx")
	require.NoError(t, unix.IoctlSetPointerInt(mfd, unix.TIOCSPTLCK, 0))
	n, err := unix.IoctlGetUint32(mfd, unix.TIOCGPTN)
	require.NoError(t, err)
	slave, err := os.OpenFile("/dev/pts/"+strconv.Itoa(int(n)), os.O_RDWR|unix.O_NOCTTY, 0)
	require.NoError(t, err)
	defer slave.Close()

	cmd := exec.Command(bash, "--norc", "--noprofile", "--noediting", "-i")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.Env = append(os.Environ(), "PS1=$ ", "TERM=dumb")
	// A session of its own with the terminal as its controlling terminal:
	// the shell runs jobs in process groups of their own, and the kernel
	// stops a background job that touches the terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	require.NoError(t, cmd.Start())
	s := &ptyShell{master: master, cmd: cmd}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := master.Read(buf)
			s.mu.Lock()
			s.out.Write(buf[:n])
			s.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		master.Close()
		if t.Failed() {
			t.Logf("terminal:\n%s", s.output())
		}
	})
	return s
}

func (s *ptyShell) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

func (s *ptyShell) send(t *testing.T, line string) {
	t.Helper()
	_, err := s.master.WriteString(line + "\n")
	require.NoError(t, err)
}

// await waits for re on the terminal and returns its first submatch.
func (s *ptyShell) await(t *testing.T, re string) string {
	t.Helper()
	rx := regexp.MustCompile(re)
	var m []string
	require.Eventually(t, func() bool {
		m = rx.FindStringSubmatch(s.output())
		return m != nil
	}, 30*time.Second, 10*time.Millisecond, "no %q on the terminal", re)
	if len(m) > 1 {
		return m[1]
	}
	return m[0]
}

// termios reads the terminal's modes (the pair shares them).
func (s *ptyShell) termios(t *testing.T) *unix.Termios {
	t.Helper()
	tio, err := unix.IoctlGetTermios(int(s.master.Fd()), unix.TCGETS)
	require.NoError(t, err)
	return tio
}

// procState is the one-letter state of a process (R, S, T, ...).
func procState(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	require.NoError(t, err)
	// pid (comm) state ...: comm may hold spaces, so cut after the last ')'.
	rest := string(b[bytes.LastIndexByte(b, ')')+2:])
	return strings.Fields(rest)[0]
}

// A VMM started in the background from an interactive shell ('govmm run
// ... &', as for a standby in README) leaves the terminal alone: it is not
// stopped by SIGTTOU or SIGTTIN, its control API answers, and the
// terminal stays in cooked mode. In the foreground the console is
// attached: raw mode, and Ctrl-A x quits and restores the terminal.
func TestConsoleOnlyInTheForeground(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	sh := newPTYShell(t)
	sh.await(t, `\$ $`)
	cooked := sh.termios(t)
	require.NotZero(t, cooked.Lflag&unix.ICANON, "the shell's terminal starts cooked")

	sock := filepath.Join(dir, "bg.sock")
	sh.send(t, fmt.Sprintf("%s run --kernel %s --initrd %s --mem 64M --net none --api-sock %s & echo BGPID=$!", govmmBin, kernel, initrd, sock))
	pid, err := strconv.Atoi(sh.await(t, `BGPID=(\d+)`))
	require.NoError(t, err)
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGKILL) })
	waitSocket(t, sock)
	out, errOut, status := govmm(t, 10*time.Second, "ctl", "--api-sock", sock, "info")
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "running")
	require.NotEqual(t, "T", procState(t, pid), "the background VMM was stopped (tty output or input)")
	require.NotZero(t, sh.termios(t).Lflag&unix.ICANON, "a background VMM put the terminal in raw mode")
	require.NoError(t, syscall.Kill(pid, syscall.SIGTERM))
	sh.send(t, fmt.Sprintf("wait %d; echo BGDONE=$?", pid))
	require.Equal(t, "143", sh.await(t, `BGDONE=(\d+)`), "SIGTERM ends it (128+15)")

	fg := filepath.Join(dir, "fg.sock")
	sh.send(t, fmt.Sprintf("%s run --kernel %s --initrd %s --mem 64M --net none --api-sock %s; echo FGDONE=$?", govmmBin, kernel, initrd, fg))
	waitSocket(t, fg)
	require.Eventually(t, func() bool { return sh.termios(t).Lflag&unix.ICANON == 0 }, 10*time.Second, 10*time.Millisecond,
		"the foreground VMM attaches the console (raw mode)")
	_, err = sh.master.Write([]byte{escapeKey, 'x'})
	require.NoError(t, err)
	sh.await(t, `FGDONE=\d+`)
	require.NotZero(t, sh.termios(t).Lflag&unix.ICANON, "the terminal is restored after Ctrl-A x")
}
