package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Memory is a process's resident memory, split into guest RAM and the
// rest, read from /proc/PID/smaps.
type Memory struct {
	RSSKiB      uint64 // all resident memory
	GuestRSSKiB uint64 // resident part of the guest RAM mapping
}

// OverheadKiB is the VMM's own memory: RSS minus guest RAM touched.
func (m Memory) OverheadKiB() uint64 { return m.RSSKiB - m.GuestRSSKiB }

// readMemory sums Rss over pid's mappings and picks out the guest RAM
// mapping: the anonymous mapping of exactly guestBytes.
func readMemory(pid int, guestBytes uint64) (Memory, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return Memory{}, err
	}
	defer f.Close()
	var m Memory
	var curSize uint64
	var curAnon bool
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if strings.Contains(fields[0], "-") && len(fields) >= 5 {
			// a mapping header: start-end perms offset dev inode [path]
			var lo, hi uint64
			if _, err := fmt.Sscanf(fields[0], "%x-%x", &lo, &hi); err == nil {
				curSize = hi - lo
				curAnon = len(fields) == 5
			}
			continue
		}
		if fields[0] == "Rss:" && len(fields) >= 2 {
			kb, _ := strconv.ParseUint(fields[1], 10, 64)
			m.RSSKiB += kb
			if curAnon && curSize == guestBytes && m.GuestRSSKiB == 0 {
				m.GuestRSSKiB = kb
			}
		}
	}
	return m, sc.Err()
}

// bootTrial starts cmd, waits for ready on its stdout, samples its memory,
// then ends it. It returns the time from start to the ready line.
func bootTrial(ctx context.Context, cmd *exec.Cmd, ready string, guestBytes uint64, timeout time.Duration) (time.Duration, Memory, error) {
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, Memory{}, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	cmd.Stdin = nil
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, Memory{}, err
	}
	defer func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}()
	found := make(chan time.Duration, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if strings.Contains(sc.Text(), ready) {
				found <- time.Since(start)
				break
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		close(found)
	}()
	select {
	case d, ok := <-found:
		if !ok {
			return 0, Memory{}, fmt.Errorf("%s exited before the ready line: %s", cmd.Path, lastLine(stderr.String()))
		}
		mem, err := readMemory(cmd.Process.Pid, guestBytes)
		return d, mem, err
	case <-time.After(timeout):
		return 0, Memory{}, fmt.Errorf("%s: no ready line within %s", cmd.Path, timeout)
	case <-ctx.Done():
		return 0, Memory{}, ctx.Err()
	}
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if s == "" {
		return "no output"
	}
	return s
}

// errNoPeer says a peer program is not installed.
var errNoPeer = errors.New("not installed")
