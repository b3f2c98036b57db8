package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/guestimg"
)

// The command script survives any argument: run by the host's sh (as
// L1 runs it), it gives the command exactly the argv and environment it
// was given, in the given directory.
func TestCommandScriptQuoting(t *testing.T) {
	t.Parallel()
	args := []string{"it's", "a b", "$HOME", "`id`", "$(id)", `back\slash`, "new\nline", "", "*", "--", `"`, "'", "tab\there", "ünï"}
	dir := t.TempDir()
	cfg := Config{
		Command: append([]string{"sh", "-c", `pwd; printf '[%s]\n' "$@"; printf '<%s>\n' "$LAB_X"; printf '<%s>\n' "$GOVMM_LAB"`, "sh"}, args...),
		Dir:     dir,
		Env:     []string{"LAB_X=it's $(not) run"},
	}
	script := filepath.Join(t.TempDir(), "cmd.sh")
	require.NoError(t, os.WriteFile(script, commandScript(cfg), 0o644))
	out, err := exec.Command("/bin/sh", script).CombinedOutput()
	require.NoError(t, err, "%s", out)
	var want strings.Builder
	want.WriteString(dir + "\n")
	for _, a := range args {
		want.WriteString("[" + a + "]\n")
	}
	want.WriteString("<it's $(not) run>\n<1>\n")
	assert.Equal(t, want.String(), string(out))
}

// A pinned command runs on the CPUs named and nowhere else, and so do the
// processes it starts; "all" leaves it free.
func TestCommandScriptPin(t *testing.T) {
	t.Parallel()
	if runtime.NumCPU() < 2 {
		t.Skip("pinning shows only with two CPUs or more")
	}
	allowed := func(pin string) string {
		cfg := Config{Command: []string{"sh", "-c", "grep Cpus_allowed_list /proc/self/status"}, Dir: "/", CPUs: 2, Pin: pin, QEMU: "sh"}
		require.NoError(t, cfg.fill())
		script := filepath.Join(t.TempDir(), "cmd.sh")
		require.NoError(t, os.WriteFile(script, commandScript(cfg), 0o644))
		out, err := exec.Command("/bin/sh", script).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return strings.TrimSpace(strings.TrimPrefix(string(out), "Cpus_allowed_list:"))
	}
	assert.Equal(t, "0", allowed(""), "the default for an L1 of 2 vCPUs")
	assert.Equal(t, "1", allowed("1"))
	assert.Equal(t, fmt.Sprintf("0-%d", runtime.NumCPU()-1), allowed("all"))
	bad := Config{Command: []string{"true"}, Pin: "0; reboot", QEMU: "sh"}
	assert.ErrorContains(t, bad.fill(), "CPU list")
}

// L1's CPU model: a modern AMD family unless asked otherwise (the "max"
// model alone says family 0xf, whose boot-time GART scans no current
// machine makes); one word, as QEMU's -cpu takes it.
func TestCPUModel(t *testing.T) {
	t.Parallel()
	cfg := Config{Command: []string{"true"}, QEMU: "sh"}
	require.NoError(t, cfg.fill())
	assert.Equal(t, DefaultCPUModel, cfg.CPUModel)
	assert.Contains(t, cfg.CPUModel, "family=26")
	asked := Config{Command: []string{"true"}, QEMU: "sh", CPUModel: "max"}
	require.NoError(t, asked.fill())
	assert.Equal(t, "max", asked.CPUModel)
	bad := Config{Command: []string{"true"}, QEMU: "sh", CPUModel: "max -device foo"}
	assert.ErrorContains(t, bad.fill(), "CPU model")
}

// The holder starts before the command, which runs only once the holder
// says it holds; a holder that dies first is said, and the command runs
// anyway.
func TestCommandScriptHolder(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	mark := filepath.Join(dir, "held")
	run := func(holder string) string {
		cfg := Config{Command: []string{"sh", "-c", "cat " + mark + " 2>/dev/null || echo not held"}, Dir: dir,
			Holder: []string{"sh", "-c", holder}}
		script := filepath.Join(t.TempDir(), "cmd.sh")
		require.NoError(t, os.WriteFile(script, commandScript(cfg), 0o644))
		out, err := exec.Command("/bin/sh", script).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}
	assert.Equal(t, "holding\n", run("sleep 0.3; echo holding >"+mark+"; echo holding; sleep 1"))
	require.NoError(t, os.Remove(mark))
	assert.Equal(t, "lab: the VM holder did not start (L1 rewrites its code as VMs come and go)\nnot held\n", run("exit 1"))
}

// A directory that does not exist in L1 fails the command with 126, as a
// shell would, rather than running it elsewhere.
func TestCommandScriptBadDir(t *testing.T) {
	t.Parallel()
	script := filepath.Join(t.TempDir(), "cmd.sh")
	require.NoError(t, os.WriteFile(script, commandScript(Config{Command: []string{"true"}, Dir: "/nonexistent/dir"}), 0o644))
	err := exec.Command("/bin/sh", script).Run()
	var ee *exec.ExitError
	require.True(t, errors.As(err, &ee), "%v", err)
	assert.Equal(t, 126, ee.ExitCode())
}

func TestShellQuote(t *testing.T) {
	t.Parallel()
	assert.Equal(t, `'plain'`, shellQuote("plain"))
	assert.Equal(t, `''`, shellQuote(""))
	assert.Equal(t, `'it'\''s'`, shellQuote("it's"))
}

func TestPassEnv(t *testing.T) {
	t.Parallel()
	for _, n := range []string{"PATH", "HOME", "GOFLAGS", "GOVMM_CACHE", "CGO_ENABLED", "TERM"} {
		assert.True(t, passEnv(n), n)
	}
	for _, n := range []string{"SSH_AUTH_SOCK", "LD_PRELOAD", "PWD", "OLDPWD", "DISPLAY"} {
		assert.False(t, passEnv(n), n)
	}
}

// L1's QEMU command line: the sizes asked for, the kernel and initrd, the
// host's / read-only, the control and output channels, one writable 9p
// share per Config.Shares.
func TestQEMUArgs(t *testing.T) {
	t.Parallel()
	cfg := Config{CPUs: 3, MemMiB: 4096, Shares: []string{"/a/b", "/c"}, CPUModel: "max,family=26,model=1"}
	img := guestimg.Image{Kernel: "/k/vmlinuz", Initrd: "/k/initrd.img"}
	args := qemuArgs(cfg, img, "/ctl", "/ctl/out.sock", "/ctl/console.log")
	after := func(flag string) []string {
		var vals []string
		for i, a := range args {
			if a == flag && i+1 < len(args) {
				vals = append(vals, args[i+1])
			}
		}
		return vals
	}
	assert.Equal(t, []string{"3"}, after("-smp"))
	assert.Equal(t, []string{"4096"}, after("-m"))
	assert.Equal(t, []string{"/k/vmlinuz"}, after("-kernel"))
	assert.Equal(t, []string{"/k/initrd.img"}, after("-initrd"))
	assert.Equal(t, []string{"max,family=26,model=1"}, after("-cpu"), "the CPU model asked for")
	assert.Contains(t, args, "-no-reboot", "L1's reboot ends QEMU")
	require.Len(t, after("-append"), 1)
	for _, opt := range []string{"console=ttyS0", "panic=-1", "softlockup_panic=1"} {
		assert.Contains(t, strings.Fields(after("-append")[0]), opt, "a dead or stuck L1 ends QEMU")
	}
	assert.Equal(t, []string{
		"local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
		"local,path=/ctl,mount_tag=labctl,security_model=none",
		"local,path=/a/b,mount_tag=share0,security_model=none,multidevs=remap",
		"local,path=/c,mount_tag=share1,security_model=none,multidevs=remap",
	}, after("-virtfs"))
	assert.True(t, slices.Contains(after("-chardev"), "socket,id=out,path=/ctl/out.sock"))
	assert.True(t, slices.Contains(after("-chardev"), "file,id=console,path=/ctl/console.log"))
	assert.Contains(t, after("-device"), "virtserialport,chardev=out,name=govmm.out")
	assert.Empty(t, after("-L"), "the system QEMU's own firmware")

	cfg.qemuDataDirs = []string{"/q/share/qemu", "/usr/share/qemu"}
	args = qemuArgs(cfg, img, "/ctl", "/ctl/out.sock", "/ctl/console.log")
	assert.Equal(t, []string{"/q/share/qemu", "/usr/share/qemu"}, after("-L"), "the lab's QEMU's firmware first, in order")
}

// A QEMU that is not there: one clear error naming what to install,
// before anything is built or booted.
func TestRunWithoutQEMU(t *testing.T) {
	t.Parallel()
	_, err := Run(t.Context(), Config{Command: []string{"true"}, QEMU: "/nonexistent/qemu-system-x86_64", CacheDir: t.TempDir()})
	require.ErrorIs(t, err, ErrNoQEMU)
	assert.Contains(t, err.Error(), "/nonexistent/qemu-system-x86_64")
	assert.Contains(t, err.Error(), "apt-get install qemu-system-x86")
	assert.NotContains(t, err.Error(), "\n")
}

// requireQEMU skips where QEMU is not installed: the lab cannot run.
func requireQEMU(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skipf("needs qemu-system-x86_64 (apt-get install qemu-system-x86): %v", err)
	}
	if InLab() {
		t.Skip("inside the lab already (nested labs are not supported)")
	}
}

// These boot L1 for real (QEMU here, on this host, in software): a few
// seconds each.

// The command's output and exit status come back from L1, which runs
// under bookworm-backports' QEMU on Debian 12 by default (QEMUAuto).
func TestLabRunsCommand(t *testing.T) {
	requireQEMU(t)
	var out, log bytes.Buffer
	status, err := Run(t.Context(), Config{
		Command: []string{"sh", "-c", `printf 'out %s\n' "$1"; printf 'err\n' >&2; [ -c /dev/kvm ] && echo kvm; exit 3`, "sh", "it's"},
		Stdout:  &out, Log: &log, Timeout: 5 * time.Minute,
	})
	require.NoError(t, err, "log: %s", log.String())
	assert.Equal(t, 3, status)
	assert.Contains(t, out.String(), "out it's\nerr\nkvm\n")
	assert.Contains(t, out.String(), "lab: L1 ", "the line that says where the command ran")
	assert.Contains(t, log.String(), "command exited with status 3")
	if guestimg.LabQEMUWanted() {
		assert.Regexp(t, `lab: QEMU 1\d\.\S+ .*from bookworm-backports`, log.String(), "Debian 12: bookworm-backports' QEMU by default")
		assert.NotContains(t, log.String(), "lab: no QEMU from", "the fetch worked")
	} else {
		assert.NotContains(t, log.String(), "lab: QEMU ", "elsewhere the system's QEMU")
	}
}

// --qemu system: the system's QEMU runs L1 and no other is fetched or
// named; --qemu backports where there is none to fetch (not Debian 12):
// a clear error.
func TestLabSystemQEMU(t *testing.T) {
	requireQEMU(t)
	if !guestimg.LabQEMUWanted() {
		_, err := Run(t.Context(), Config{Command: []string{"true"}, QEMU: QEMUBackports, Timeout: 5 * time.Minute})
		require.ErrorIs(t, err, guestimg.ErrLabQEMUNotNeeded)
	}
	var out, log bytes.Buffer
	status, err := Run(t.Context(), Config{
		Command: []string{"true"}, QEMU: QEMUSystem,
		Stdout: &out, Log: &log, Timeout: 5 * time.Minute,
	})
	require.NoError(t, err, "log: %s", log.String())
	assert.Equal(t, 0, status)
	assert.NotContains(t, log.String(), "lab: QEMU ", "the system's QEMU, named by nothing")
	assert.Contains(t, out.String(), "lab: L1 ")
}

// Which QEMU, without booting one: with nothing to fetch from (a mirror
// that refuses), the default falls back to the system's and says so,
// and the next default run takes the failure as remembered (an offline
// host does not wait for apt-get's retries at every L1 boot), while
// --qemu backports fetches again and fails with the fetch's error;
// --qemu system and a path never fetch.
func TestQEMUChoiceWhenFetchFails(t *testing.T) {
	t.Setenv("GOVMM_LAB_QEMU_MIRROR", "http://127.0.0.1:9/debian") // the discard port: refused
	cache := t.TempDir()
	choose := func(asked string) (Config, string, error) {
		var log bytes.Buffer
		cfg := Config{QEMU: "/usr/bin/qemu-system-x86_64", CacheDir: cache, Log: &log}
		err := cfg.useLabQEMU(t.Context(), asked)
		return cfg, log.String(), err
	}
	for _, asked := range []string{QEMUSystem, "/opt/qemu/bin/qemu-system-x86_64"} {
		cfg, log, err := choose(asked)
		require.NoError(t, err, asked)
		assert.Equal(t, "/usr/bin/qemu-system-x86_64", cfg.QEMU, asked)
		assert.Empty(t, log, asked)
	}
	cfg, log, err := choose(QEMUAuto)
	require.NoError(t, err, "the default never fails for want of the backport")
	assert.Equal(t, "/usr/bin/qemu-system-x86_64", cfg.QEMU, "the system's")
	assert.Empty(t, cfg.qemuEnv)
	if !guestimg.LabQEMUWanted() {
		_, _, berr := choose(QEMUBackports)
		assert.Empty(t, log, "not Debian 12: nothing to say")
		require.ErrorIs(t, berr, guestimg.ErrLabQEMUNotNeeded)
		return
	}
	assert.Contains(t, log, "lab: no QEMU from bookworm-backports", "the fallback is said")
	assert.Contains(t, log, "/usr/bin/qemu-system-x86_64 instead")
	assert.NotContains(t, log, "failed recently", "the first failure is the fetch's own")
	assert.Contains(t, log, "fetching the lab's QEMU")

	cfg, log, err = choose(QEMUAuto)
	require.NoError(t, err)
	assert.Equal(t, "/usr/bin/qemu-system-x86_64", cfg.QEMU, "the system's again")
	assert.Contains(t, log, "failed recently", "the second run takes the remembered failure")
	assert.Contains(t, log, "127.0.0.1:9", "which mirror failed")
	assert.Contains(t, log, "--qemu backports", "how to try again now")
	assert.NotContains(t, log, "fetching the lab's QEMU", "no fetch")

	_, log, berr := choose(QEMUBackports)
	require.Error(t, berr, "--qemu backports insists")
	assert.NotErrorIs(t, berr, guestimg.ErrLabQEMUFailedRecently, "asked for by name, it fetches again")
	assert.Contains(t, berr.Error(), "--qemu backports")
	assert.Contains(t, log, "fetching the lab's QEMU", "it fetched")
}

// A run that outlives its timeout is killed: the error says so and
// carries the tail of L1's console, and Run returns at once.
func TestLabTimeout(t *testing.T) {
	requireQEMU(t)
	// The timeout covers L1's boot too (7 s on a quiet host). Under load
	// the boot can outlast it: a CI run with the other packages' tests
	// beside it once took more than 60 s, and the command never started.
	// That run still timed out as it should, and is checked for it, but
	// says nothing of a command killed mid-run; so the test tries again
	// with a longer timeout, until one run gets to the command.
	for _, timeout := range []time.Duration{60 * time.Second, 3 * time.Minute, 6 * time.Minute} {
		_, err := Run(t.Context(), Config{
			// Level 3 (KERN_ERR) reaches L1's console at loglevel=4.
			Command: []string{"sh", "-c", "echo '<3>govmm-lab-test: about to hang' >/dev/kmsg; sleep 600"},
			Timeout: timeout,
		})
		require.ErrorIs(t, err, ErrTimeout)
		var le *Error
		require.True(t, errors.As(err, &le))
		assert.Contains(t, err.Error(), "last lines of L1's console")
		// The time from QEMU's start to L1 killed (the wait for the lab's
		// lock, if another run held it, is not part of the timeout).
		if m := regexp.MustCompile(`^timed out after (\S+)$`).FindStringSubmatch(le.Reason); m != nil {
			took, err := time.ParseDuration(m[1])
			require.NoError(t, err)
			assert.Less(t, took, timeout+5*time.Second, "no hang after the timeout")
			t.Logf("L1 did not start the command within %v (a loaded host); trying a longer timeout", timeout)
			continue
		}
		assert.Contains(t, le.Console, "govmm-lab-test: about to hang")
		m := regexp.MustCompile(`^command still running after (\S+) \(timeout ` + regexp.QuoteMeta(timeout.String()) + `\); L1 killed$`).FindStringSubmatch(le.Reason)
		require.NotNil(t, m, le.Reason)
		took, err := time.ParseDuration(m[1])
		require.NoError(t, err)
		assert.Less(t, took, timeout+5*time.Second, "no hang after the timeout")
		return
	}
	t.Fatal("L1 never started the command, even with a 6-minute timeout")
}

// L1 powering itself off without a word is not the command's failure:
// the harness says so and runs the command again, once.
func TestLabRetriesWhenL1Dies(t *testing.T) {
	requireQEMU(t)
	share := t.TempDir()
	marker := filepath.Join(share, "first-attempt")
	var out, log bytes.Buffer
	// The first attempt powers L1 off from inside (SysRq o) and leaves a
	// marker on the shared directory; the second sees it and succeeds.
	status, err := Run(context.Background(), Config{
		Command: []string{"sh", "-c", `if [ -e "$1" ]; then echo second attempt; exit 0; fi
			echo first attempt; : >"$1"; sync; echo o >/proc/sysrq-trigger; sleep 60; echo not reached`, "sh", marker},
		Shares: []string{share}, Stdout: &out, Log: &log, Timeout: 5 * time.Minute,
	})
	require.NoError(t, err, "log: %s", log.String())
	assert.Equal(t, 0, status)
	assert.Contains(t, out.String(), "second attempt\n")
	assert.NotContains(t, out.String(), "not reached")
	assert.Contains(t, log.String(), "L1 itself failed, not the command: running it again (1 of 1 retries)")
	assert.Contains(t, log.String(), "L1 ended while the command ran, without its exit status")

	// Without retries the same death is an error of the lab, not a status.
	require.NoError(t, os.Remove(marker))
	_, err = Run(context.Background(), Config{
		Command: []string{"sh", "-c", `: >"$1"; sync; echo o >/proc/sysrq-trigger; sleep 60`, "sh", marker},
		Shares:  []string{share}, Retries: -1, Timeout: 5 * time.Minute,
	})
	var le *Error
	require.True(t, errors.As(err, &le), "got %v", err)
	assert.Contains(t, le.Reason, "L1 ended while the command ran")
}

// An L1 that never gets to the command (here QEMU started with its CPUs
// stopped, -S: a boot that hangs) is killed once the boot limit passes
// and run again, not left to the whole timeout.
func TestLabRetriesWhenStuckAtBoot(t *testing.T) {
	requireQEMU(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	require.NoError(t, err)
	stopped := filepath.Join(t.TempDir(), "qemu-stopped")
	require.NoError(t, os.WriteFile(stopped, fmt.Appendf(nil, "#!/bin/sh\nexec %s -S \"$@\"\n", shellQuote(qemu)), 0o755))
	var out, log bytes.Buffer
	began := time.Now()
	_, err = Run(t.Context(), Config{
		Command: []string{"echo", "not reached"}, QEMU: stopped, bootLimit: time.Second, ShareCPUs: true, // stopped: no CPU used
		Stdout: &out, Log: &log, Timeout: 5 * time.Minute,
	})
	took := time.Since(began)
	var le *Error
	require.True(t, errors.As(err, &le), "got %v", err)
	assert.NotErrorIs(t, err, ErrTimeout)
	assert.Regexp(t, `^L1 ended by the harness: the command had not started 1s after QEMU did .*, L1 stuck at boot \(after \d+s\)$`, le.Reason)
	assert.Contains(t, log.String(), "L1 itself failed, not the command: running it again (1 of 1 retries)")
	assert.Empty(t, out.String())
	// Two attempts, each killed at the harness's first look (every 10 s)
	// past the limit.
	assert.Less(t, took, time.Minute)
}

// An L1 that shares CPUs boots while other L1s hold every CPU of this
// host; one that does not waits for them (here, until its context ends).
func TestLabShareCPUs(t *testing.T) {
	requireQEMU(t)
	cpus := runtime.NumCPU()
	unlock, err := lockCPUs(t.Context(), filepath.Join(guestimg.DefaultCacheDir(), "lab"), cpus, cpus, &bytes.Buffer{})
	require.NoError(t, err)
	defer unlock()

	var out, log bytes.Buffer
	bounded, stop := context.WithTimeout(t.Context(), 3*time.Minute) // a wait for CPUs fails here
	defer stop()
	status, err := Run(bounded, Config{Command: []string{"echo", "shared"}, CPUs: 2, ShareCPUs: true,
		Stdout: &out, Log: &log, Timeout: 5 * time.Minute})
	require.NoError(t, err, "log: %s", log.String())
	assert.Equal(t, 0, status)
	assert.Contains(t, out.String(), "shared\n")
	assert.NotContains(t, log.String(), "waiting for")

	log.Reset()
	short, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	_, err = Run(short, Config{Command: []string{"echo", "not shared"}, CPUs: 2, Log: &log, Timeout: 5 * time.Minute})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Contains(t, err.Error(), "waiting for CPUs")
	assert.Contains(t, log.String(), "waiting for 2 of this host's")
}
