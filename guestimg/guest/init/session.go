package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// sessionArgv0 is argv[0] of /init re-executed as command mode's session
// leader (see runSession).
const sessionArgv0 = "govmm-session"

// runSession runs argv as the one job of command mode and returns the
// shell-style exit status. /init starts it in a new session whose
// controlling terminal is the console.
//
// It exists because of what Linux does when a session leader exits: it
// hangs its controlling terminal up, and the hangup discards whatever the
// serial driver has not sent yet (tty_ldisc_hangup flushes the driver's
// buffer). Were the command itself the session leader, the end of, say,
// "dmesg" would vanish whenever the UART was slower than the command,
// which in the lab is often. So this process leads the session, runs the
// command in its foreground process group, and when it ends waits for the
// console to drain (tcdrain) before it exits and the hangup comes.
//
// /init ignores the terminal's signals, and ignored signals stay ignored
// across exec. This process catches SIGINT, SIGQUIT, SIGHUP and SIGPIPE
// instead (and does nothing on them: they are for the command), so that
// the command starts with their default actions: ^C ends it. SIGTSTP,
// SIGTTIN and SIGTTOU stay ignored: there is no job control to come back
// from a stop, and with SIGTTOU ignored the drain works even after the
// command moved the terminal to another process group.
func runSession(argv []string) int {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGPIPE)
	path, err := lookPath(argv[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "govmm-init: run %s: %v\n", argv[0], err)
		return 127
	}
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{
		Dir:   "/",
		Env:   os.Environ(),
		Files: []uintptr{0, 1, 2},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "govmm-init: run %s: %v\n", argv[0], err)
		if err == syscall.EACCES || err == syscall.ENOEXEC {
			return 126
		}
		return 127
	}
	var ws syscall.WaitStatus
	for {
		_, err := syscall.Wait4(pid, &ws, 0, nil)
		if err != syscall.EINTR {
			break
		}
	}
	if err := drainTTY(1); err != nil {
		logKernel("govmm-init: command mode: " + err.Error())
	}
	return exitStatus(ws)
}
