package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
)

// markedProcs lists the live processes (other than skip) whose
// environment holds marker: a bench and everything it started inherit it,
// wherever they were reparented to.
func markedProcs(t *testing.T, marker string, skip int) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	require.NoError(t, err)
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == skip {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.Contains(env, []byte(marker+"\x00")) {
			continue // gone, or a zombie (whose environ reads empty)
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		out = append(out, fmt.Sprintf("%d %s", pid, bytes.ReplaceAll(cmdline, []byte{0}, []byte{' '})))
	}
	return out
}

// SIGTERM or SIGINT in the middle of a suite stops govmm bench with
// 128+signal, and it leaves nothing behind: none of the VMMs it started
// (govmm run, standby, witness; QEMU) runs on, and no govmm-bench-*
// directory stays in TMPDIR.
func TestBenchSignalLeavesNothing(t *testing.T) {
	kvmtest.Require(t)
	tests := []struct {
		name string
		sig  syscall.Signal
		args []string
		// during: the signal comes once a process whose command line
		// holds this runs (the bench's own child, mid-trial).
		during string
	}{
		{"failover SIGTERM", syscall.SIGTERM, []string{"--quick", "failover"}, " standby "},
		{"failover SIGINT", syscall.SIGINT, []string{"--quick", "failover"}, " --replicate-to "},
		{"boot SIGTERM", syscall.SIGTERM, []string{"--quick", "--guest", "tiny", "--mem", "64", "boot"}, "qemu-system-x86_64 "},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Short: the suites bind unix sockets in their directories.
			tmp, err := os.MkdirTemp("", "gb")
			require.NoError(t, err)
			t.Cleanup(func() { os.RemoveAll(tmp) })
			marker := fmt.Sprintf("GOVMM_BENCH_TEST=%d-%d-%d", os.Getpid(), i, time.Now().UnixNano())
			cmd := exec.Command(govmmBin, append([]string{"bench", "--out", t.TempDir()}, tt.args...)...)
			cmd.Env = append(os.Environ(), "TMPDIR="+tmp, marker)
			var stderr logBuffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			t.Cleanup(func() {
				for _, p := range markedProcs(t, marker, -1) {
					var pid int
					fmt.Sscan(p, &pid)
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			})
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			// Mid-run: once the suite has a VMM of its own running.
			tick, deadline := time.NewTicker(time.Millisecond), time.After(time.Minute)
			defer tick.Stop()
			for !slices.ContainsFunc(markedProcs(t, marker, cmd.Process.Pid), func(p string) bool { return strings.Contains(p, tt.during) }) {
				select {
				case err := <-exited:
					t.Fatalf("bench exited (%v) before %q ran: %s", err, tt.during, stderr.String())
				case <-deadline:
					t.Fatalf("no %q started within a minute: %s", tt.during, stderr.String())
				case <-tick.C:
				}
			}
			require.NoError(t, cmd.Process.Signal(tt.sig))
			select {
			case err = <-exited:
			case <-time.After(time.Minute):
				t.Fatalf("bench still runs a minute after %v: %s", tt.sig, stderr.String())
			}
			require.Empty(t, markedProcs(t, marker, -1), "processes left running")
			left, gerr := filepath.Glob(filepath.Join(tmp, "govmm-bench-*"))
			require.NoError(t, gerr)
			require.Empty(t, left, "temporary directories left behind")
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee, stderr.String())
			require.Equal(t, 128+int(tt.sig), ee.ExitCode(), stderr.String())
			require.Contains(t, stderr.String(), "govmm: bench: "+tt.sig.String()+": stopping the trial, its processes and temporary files")
		})
	}
}
