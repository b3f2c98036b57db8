package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/bench"
	"govmm/ctlapi"
	"govmm/internal/kvmtest"
	"govmm/replicate/stream"
	"govmm/vmm"
)

// firstLine is s up to its first newline.
func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// requireNoTrace fails when stderr holds a Go panic, a goroutine dump or
// a raw slog line: none may be reachable from the command line.
func requireNoTrace(t *testing.T, stderr string) {
	t.Helper()
	for _, bad := range []string{"panic", "goroutine ", "fatal error", "level="} {
		require.NotContains(t, stderr, bad)
	}
}

// Every command line that cannot run as given: exit status 2, one line
// on stderr (exactly this one), nothing on stdout, and never a Go trace.
// The inputs of issue 14 first, then their kin across the commands.
func TestCLIUsageErrors(t *testing.T) {
	snap := filepath.Join(t.TempDir(), "vm.snap") // never read: refused first
	k, i := tinyImage(t)                          // never booted: refused first
	tiny := []string{"run", "--kernel", k, "--initrd", i, "--net", "none"}
	cases := []struct {
		name string
		args []string
		line string
	}{
		// Silent bad values, one check for run, standby and ctl replicate.
		{"epoch 0", []string{"run", "--epoch", "0"}, "govmm: run: --epoch 0: must be at least 1ms (see 'govmm help run')"},
		{"epoch negative", []string{"run", "--epoch", "-1s"}, "govmm: run: --epoch -1s: must be at least 1ms (see 'govmm help run')"},
		{"epoch not a duration", []string{"run", "--epoch", "25"}, "govmm: run: --epoch 25: not a duration (e.g. 25ms, 2s) (see 'govmm help run')"},
		{"failover timeout 0", []string{"run", "--failover-timeout", "0"}, "govmm: run: --failover-timeout 0: must be at least 10ms (see 'govmm help run')"},
		{"failover timeout negative", []string{"run", "--failover-timeout", "-5s"}, "govmm: run: --failover-timeout -5s: must be at least 10ms (see 'govmm help run')"},
		{"witness lease too short", []string{"run", "--witness-lease", "1ms"}, "govmm: run: --witness-lease 1ms: want 10ms to 10m0s (see 'govmm help run')"},
		{"standby epoch 0", []string{"standby", "--listen", "127.0.0.1:7000", "--epoch", "0"}, "govmm: standby: --epoch 0: must be at least 1ms (see 'govmm help standby')"},
		{"standby failover timeout negative", []string{"standby", "--listen", "127.0.0.1:7000", "--failover-timeout", "-5s"}, "govmm: standby: --failover-timeout -5s: must be at least 10ms (see 'govmm help standby')"},
		{"ctl replicate epoch 0", []string{"ctl", "replicate", "--to", "127.0.0.1:7000", "--epoch", "0"}, "govmm: ctl replicate: --epoch 0: must be at least 1ms (see 'govmm help ctl replicate')"},
		{"ctl replicate epoch negative", []string{"ctl", "replicate", "--to", "127.0.0.1:7000", "--epoch", "-1s"}, "govmm: ctl replicate: --epoch -1s: must be at least 1ms (see 'govmm help ctl replicate')"},
		{"epoch max negative", []string{"run", "--epoch-max", "-1s"}, "govmm: run: --epoch-max -1s: must be at least 1ms (see 'govmm help run')"},
		{"epoch max below the epoch", []string{"run", "--epoch", "50ms", "--epoch-max", "20ms"}, "govmm: run: --epoch-max 20ms is below --epoch 50ms (see 'govmm help run')"},
		{"standby read spin too long", []string{"standby", "--listen", "127.0.0.1:7000", "--read-spin", "20ms"}, "govmm: standby: --read-spin 20ms: want 0 (never poll) to 10ms (see 'govmm help standby')"},
		{"standby read spin negative", []string{"standby", "--listen", "127.0.0.1:7000", "--read-spin", "-1us"}, "govmm: standby: --read-spin -1us: want 0 (never poll) to 10ms (see 'govmm help standby')"},
		{"ack spin too long", []string{"run", "--ack-spin", "11ms"}, "govmm: run: --ack-spin 11ms: want 0 (never poll) to 10ms (see 'govmm help run')"},
		{"standby ack spin negative", []string{"standby", "--listen", "127.0.0.1:7000", "--ack-spin", "-1us"}, "govmm: standby: --ack-spin -1us: want 0 (never poll) to 10ms (see 'govmm help standby')"},
		{"standby epoch max too short", []string{"standby", "--listen", "127.0.0.1:7000", "--epoch-max", "100us"}, "govmm: standby: --epoch-max 100us: must be at least 1ms (see 'govmm help standby')"},
		{"ctl replicate epoch max negative", []string{"ctl", "replicate", "--to", "127.0.0.1:7000", "--epoch-max", "-1s"}, "govmm: ctl replicate: --epoch-max -1s: must be at least 1ms (see 'govmm help ctl replicate')"},
		{"witness max lease", []string{"witness", "--max-lease", "1h"}, "govmm: witness: --max-lease 1h: want 10ms to 10m0s (see 'govmm help witness')"},

		// Flag errors: one line, not the usage.
		{"unknown flag", []string{"run", "--bogus"}, "govmm: run: flag provided but not defined: --bogus (see 'govmm help run')"},
		{"unknown flag, one dash", []string{"run", "-bogus"}, "govmm: run: flag provided but not defined: --bogus (see 'govmm help run')"},
		{"flag without its value", []string{"run", "--cpus"}, "govmm: run: flag needs an argument: --cpus (see 'govmm help run')"},
		{"bad boolean", []string{"restore", "--paused=maybe", snap}, `govmm: restore: invalid boolean value "maybe" for --paused: parse error (see 'govmm help restore')`},
		{"unknown ctl flag", []string{"ctl", "info", "--yaml"}, "govmm: ctl info: flag provided but not defined: --yaml (see 'govmm help ctl info')"},

		// The flag and the unit the user typed.
		{"dirty tracking", []string{"run", "--dirty-tracking", "fast"}, "govmm: run: --dirty-tracking fast: want auto or bitmap or ring (see 'govmm help run')"},
		{"stream send buffer", []string{"run", "--stream-send-buffer", "lots"}, "govmm: run: --stream-send-buffer lots: want auto, kernel, or a size from 1 byte to 1024M (256K, 1M) (see 'govmm help run')"},
		{"cpus 0", []string{"run", "--cpus", "0"}, "govmm: run: --cpus 0: want a number of vCPUs from 1 to 32 (see 'govmm help run')"},
		{"cpus 33", []string{"run", "--cpus", "33"}, "govmm: run: --cpus 33: want a number of vCPUs from 1 to 32 (see 'govmm help run')"},
		{"cpus two", []string{"run", "--cpus", "two"}, "govmm: run: --cpus two: want a number of vCPUs from 1 to 32 (see 'govmm help run')"},
		{"mem 1 is MiB", []string{"run", "--mem", "1"}, "govmm: run: --mem 1: 1 MiB is below the minimum of 32 MiB (see 'govmm help run')"},
		{"mem 16M", []string{"run", "--mem", "16M"}, "govmm: run: --mem 16M: 16 MiB is below the minimum of 32 MiB (see 'govmm help run')"},
		{"mem odd MiB", []string{"run", "--mem", "33M"}, "govmm: run: --mem 33M: 33 MiB is not a multiple of 2 MiB (see 'govmm help run')"},
		{"mem not a size", []string{"run", "--mem", "lots"}, "govmm: run: --mem lots: not a size (e.g. 256M or 2G; a bare number is MiB) (see 'govmm help run')"},
		{"bench mem as run's", []string{"bench", "--mem", "1", "boot"}, "govmm: bench: --mem 1: 1 MiB is below the minimum of 32 MiB (see 'govmm help bench')"},
		{"bench mem not a size", []string{"bench", "--mem", "256Q", "boot"}, "govmm: bench: --mem 256Q: not a size (e.g. 256M or 2G; a bare number is MiB) (see 'govmm help bench')"},
		{"bench stream mode", []string{"bench", "--stream-modes", "none,lz4", "wire-guest"}, `govmm: bench: --stream-modes none,lz4: unknown stream mode "lz4" (none, s2, zstd, each with or without +deltas) (see 'govmm help bench')`},
		{"bench stream mode twice", []string{"bench", "--stream-modes", "s2+deltas,s2+deltas", "wire-guest"}, `govmm: bench: --stream-modes s2+deltas,s2+deltas: stream mode "s2+deltas" given twice (see 'govmm help bench')`},
		{"bench workload", []string{"bench", "--workloads", "build", "wire-guest"}, `govmm: bench: --workloads build: unknown workload "build" (demo, untar, compress, disk) (see 'govmm help bench')`},
		{"bench window", []string{"bench", "--window", "500ms", "wire-guest"}, "govmm: bench: --window 500ms: want 1s to 10m0s (see 'govmm help bench')"},
		{"bench stream modes without wire-guest", []string{"bench", "--stream-modes", "s2", "checkpoint"}, "govmm: bench: --stream-modes does not apply without the wire-guest suite, the only one that uses it (see 'govmm help bench')"},
		{"bench send buffer", []string{"bench", "--send-buffers", "auto,huge", "ack"}, `govmm: bench: --send-buffers auto,huge: send buffer "huge": want auto, kernel, or a size from 1 byte to 1024 MiB (256K, 1M) (see 'govmm help bench')`},
		{"bench send buffer twice", []string{"bench", "--send-buffers", "kernel,kernel", "ack"}, "govmm: bench: --send-buffers kernel,kernel: kernel twice (see 'govmm help bench')"},
		{"bench send buffers without ack", []string{"bench", "--send-buffers", "kernel", "checkpoint"}, "govmm: bench: --send-buffers does not apply without the ack suite, the only one that uses it (see 'govmm help bench')"},
		{"bench baseline without migration-guest", []string{"bench", "--baseline", "bin/govmm-main", "migration"}, "govmm: bench: --baseline does not apply without the boot, wire-guest or migration-guest suite, the only ones that use it (see 'govmm help bench')"},

		// Values only the command line can be wrong about.
		{"stray argument", append(tiny, "nproc"), `govmm: run: unexpected argument "nproc" (put the guest command after --) (see 'govmm help run')`},
		{"bad net", []string{"run", "--net", "bridge"}, "govmm: run: --net bridge: want user, tap:NAME or none (see 'govmm help run')"},
		{"disk option", []string{"run", "--disk", "vm.img,sparse"}, `govmm: run: --disk "vm.img,sparse": unknown option "sparse" (want ro, rw, nodiscard or discard) (see 'govmm help run')`},
		{"standby disk option", []string{"standby", "--listen", "127.0.0.1:7000", "--disk", "copy.img,trim"}, `govmm: standby: --disk "copy.img,trim": unknown option "trim" (want ro, rw, nodiscard or discard) (see 'govmm help standby')`},
		{"bad mac", []string{"run", "--mac", "01:02"}, "govmm: run: --mac 01:02: want six bytes in hex, xx:xx:xx:xx:xx:xx (see 'govmm help run')"},
		{"bad publish", []string{"run", "--publish", "80"}, "govmm: run: --publish 80: want HOSTPORT:GUESTPORT or HOSTIP:HOSTPORT:GUESTPORT (see 'govmm help run')"},
		{"publish without user net", []string{"run", "--net", "none", "--publish", "8080:80"}, "govmm: run: --publish needs --net user (see 'govmm help run')"},
		{"guest ip without prefix", []string{"run", "--guest-ip", "10.0.0.2"}, "govmm: run: --guest-ip 10.0.0.2: want ADDR/PREFIX (see 'govmm help run')"},
		{"on-standby-loss", []string{"run", "--on-standby-loss", "stop"}, "govmm: run: --on-standby-loss stop: want continue or pause (see 'govmm help run')"},
		{"checkpoint-copy", []string{"run", "--checkpoint-copy", "fast"}, "govmm: run: --checkpoint-copy fast: want auto or stop or cow (see 'govmm help run')"},
		{"checkpoint-cow-pages", []string{"run", "--checkpoint-cow-pages", "0"}, "govmm: run: --checkpoint-cow-pages 0: must be at least 1 (see 'govmm help run')"},
		{"checkpoint-cow-pages not a number", []string{"run", "--checkpoint-cow-pages", "4k"}, "govmm: run: --checkpoint-cow-pages 4k: want a number of pages (see 'govmm help run')"},
		{"replicate-to not host:port", []string{"run", "--replicate-to", "standby"}, "govmm: run: --replicate-to standby: want HOST:PORT (see 'govmm help run')"},
		{"name that cannot be a socket", []string{"run", "--name", "a/b"}, "govmm: run: --name a/b cannot name the default --api-sock (DIR/NAME.sock): give --api-sock PATH (see 'govmm help run')"},

		// The key hint: once, and where it can be followed.
		{"replicate beyond loopback without key", []string{"run", "--replicate-to", "10.0.0.2:7000"},
			"govmm: run: --replicate-to 10.0.0.2:7000: without a key, the stream uses only loopback addresses (10.0.0.2 is not one): give --key-file (see 'govmm help run')"},
		{"standby beyond loopback without key", []string{"standby", "--listen", "10.0.0.2:7000"},
			"govmm: standby: --listen 10.0.0.2:7000: without a key, the stream uses only loopback addresses (10.0.0.2 is not one): give --key-file (see 'govmm help standby')"},
		{"standby on every interface without key", []string{"standby", "--listen", ":7000"},
			"govmm: standby: --listen :7000: without a key, the stream uses only loopback addresses (an empty host is every interface): give --key-file (see 'govmm help standby')"},
		{"witness without key", []string{"run", "--witness", "127.0.0.1:7001"},
			"govmm: run: --witness 127.0.0.1:7001: --key-file is required: the witness serves only VMMs that share its key (see 'govmm help run')"},
		{"stream cipher without key", []string{"run", "--stream-cipher", "aegis-128l"},
			"govmm: run: --stream-cipher aegis-128l seals a keyed stream: give --key-file (without a key the stream, loopback only, is not sealed) (see 'govmm help run')"},
		{"standby stream cipher without key", []string{"standby", "--listen", "127.0.0.1:7000", "--stream-cipher", "aes-256-gcm"},
			"govmm: standby: --stream-cipher aes-256-gcm seals a keyed stream: give --key-file (without a key the stream, loopback only, is not sealed) (see 'govmm help standby')"},
		{"stream cipher unknown", []string{"run", "--stream-cipher", "chacha20"}, "govmm: run: --stream-cipher chacha20: want auto, aegis-128x2, aegis-128l or aes-256-gcm (see 'govmm help run')"},

		// A missing or extra argument: the same status as a flag error.
		{"standby without listen", []string{"standby"}, "govmm: standby: --listen HOST:PORT is required (see 'govmm help standby')"},
		{"standby stray argument", []string{"standby", "--listen", "127.0.0.1:7000", "now"}, `govmm: standby: unexpected argument "now" (see 'govmm help standby')`},
		{"restore without file", []string{"restore"}, "govmm: restore: want one snapshot file, got 0 arguments (see 'govmm help restore')"},
		{"restore with a run flag", []string{"restore", "--mem", "1G", snap}, "govmm: restore: --mem 1G: does not apply to restore: the snapshot holds the guest's kernel, memory, vCPUs and network settings (see 'govmm help restore')"},
		{"standby with a run flag", []string{"standby", "--listen", "127.0.0.1:7000", "--kernel", "/boot/vmlinuz"}, "govmm: standby: --kernel /boot/vmlinuz: does not apply to standby: the guest's kernel, memory, vCPUs and settings come from the primary (see 'govmm help standby')"},
		{"ctl with socket and name", []string{"ctl", "--api-sock", "/tmp/x.sock", "--name", "web", "info"}, "govmm: ctl: --api-sock and --name: give one (see 'govmm help ctl')"},
		{"ctl without command", []string{"ctl"}, "govmm: ctl: no command (info, pause, resume, snapshot, migrate, replicate, unreplicate, stats, metrics) (see 'govmm help ctl')"},
		{"ctl unknown command", []string{"ctl", "frobnicate"}, `govmm: ctl: unknown command "frobnicate" (see 'govmm help ctl')`},
		{"ctl stray argument", []string{"ctl", "info", "extra"}, `govmm: ctl info: unexpected argument "extra" (see 'govmm help ctl info')`},
		{"ctl snapshot without out", []string{"ctl", "snapshot"}, "govmm: ctl snapshot: --out FILE is required (see 'govmm help ctl snapshot')"},
		{"ctl migrate without to", []string{"ctl", "migrate"}, "govmm: ctl migrate: --to HOST:PORT is required (see 'govmm help ctl migrate')"},
		{"ctl replicate without to", []string{"ctl", "replicate"}, "govmm: ctl replicate: --to HOST:PORT is required (see 'govmm help ctl replicate')"},
		{"witness without state", []string{"witness", "--listen", "127.0.0.1:0"}, "govmm: witness: --state DIR is required (see 'govmm help witness')"},
		{"image without subcommand", []string{"image"}, "govmm: image: no subcommand: want build (see 'govmm help image')"},
		{"image unknown subcommand", []string{"image", "make"}, `govmm: image: unknown subcommand "make": want build (see 'govmm help image')`},
		{"lab without command", []string{"lab"}, "govmm: lab: no command: govmm lab [flags] -- CMD ARGS... (see 'govmm help lab')"},
		{"lab needed with a command", []string{"lab", "--needed", "--", "true"}, "govmm: lab: --needed takes no command (see 'govmm help lab')"},
		{"lab needed with a flag it ignores", []string{"lab", "--needed", "--mem", "4G"}, "govmm: lab: --mem does not apply with --needed, which runs no command (see 'govmm help lab')"},
		{"lab hold-kvm with a flag it ignores", []string{"lab", "--hold-kvm", "--share", "/tmp"}, "govmm: lab: --share does not apply with --hold-kvm, which runs no command (see 'govmm help lab')"},
		{"bench unknown suite", []string{"bench", "frobnicate"}, `govmm: bench: unknown suite "frobnicate" (boot, checkpoint, ack, migration, failover, fencing, overhead, failover-guest, overhead-guest, wire-guest, migration-guest) (see 'govmm help bench')`},
		{"version with argument", []string{"version", "now"}, `govmm: version: unexpected argument "now" (see 'govmm help version')`},
		{"unknown command", []string{"frobnicate"}, `govmm: unknown command "frobnicate" (see 'govmm help')`},
		{"help of unknown command", []string{"help", "frobnicate"}, `govmm: help: unknown command "frobnicate" (see 'govmm help')`},
		{"help of unknown ctl command", []string{"help", "ctl", "frobnicate"}, `govmm: ctl: unknown command "frobnicate" (see 'govmm help ctl')`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, errOut, status := govmm(t, time.Minute, c.args...)
			require.Equal(t, usageStatus, status, "govmm %q: %s", c.args, errOut)
			assert.Equal(t, c.line, firstLine(errOut))
			assert.Equal(t, c.line+"\n", errOut, "one line")
			assert.Empty(t, out)
			requireNoTrace(t, errOut)
		})
	}
	// No command at all: the usage, on stderr, status 2.
	out, errOut, status := govmm(t, time.Minute)
	require.Equal(t, usageStatus, status)
	require.Empty(t, out)
	require.Equal(t, "govmm: a Remus-style replicating hypervisor on KVM", firstLine(errOut))
}

// Runtime failures (what the command line could not know): status 1 and
// one line.
func TestCLIRuntimeErrors(t *testing.T) {
	k, i := tinyImage(t)
	host, err := vmm.HostMemory()
	require.NoError(t, err)
	cases := []struct {
		name string
		args []string
		line string
	}{
		{"mem beyond the host", []string{"run", "--kernel", k, "--initrd", i, "--mem", "100T"}, fmt.Sprintf("govmm: --mem 100T: more than this host has (%s)", ctlBytes(host))},
		{"missing kernel", []string{"run", "--kernel", "/nonexistent/bzImage", "--initrd", i}, "govmm: kernel: open /nonexistent/bzImage: no such file or directory"},
		{"no VM at the socket", []string{"ctl", "--api-sock", filepath.Join(t.TempDir(), "none.sock"), "info"}, ""},
		{"no VM at the default socket", []string{"ctl", "stats"}, fmt.Sprintf("govmm: no VM listening on %s: no such file or directory (the default socket: give --api-sock PATH, or --name NAME for a VM run with --name)", os.Getenv("GOVMM_API_SOCK"))},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, errOut, status := govmm(t, time.Minute, c.args...)
			require.Equal(t, 1, status, errOut)
			if c.line != "" {
				assert.Equal(t, c.line, firstLine(errOut))
			}
			assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
			assert.Empty(t, out)
			requireNoTrace(t, errOut)
		})
	}
}

// Help never recurses (help of help, -h -h), goes to stdout with status
// 0, and writes flags as the docs do: --flag.
func TestCLIHelp(t *testing.T) {
	top := [][]string{{"help"}, {"-h"}, {"--help"}, {"help", "help"}, {"-h", "-h"}, {"help", "-h"}, {"--help", "--help"},
		{"help", "help", "help"}}
	for _, args := range top {
		out, errOut, status := govmm(t, time.Minute, args...)
		require.Equal(t, 0, status, "%q: %s", args, errOut)
		require.Empty(t, errOut, "%q", args)
		require.Equal(t, "govmm: a Remus-style replicating hypervisor on KVM", firstLine(out), "%q", args)
	}
	out, _, _ := govmm(t, time.Minute, "help")
	for _, l := range strings.Split(out, "\n") {
		require.LessOrEqual(t, len([]rune(l)), 80, "help: line too long: %q", l)
	}
	for _, want := range []string{"govmm run", "govmm standby", "replication standby", "migration", "govmm ctl", "govmm restore",
		"govmm witness", "govmm image build", "govmm bench", "govmm lab", "govmm version", "govmm help"} {
		require.Contains(t, out, want)
	}
	ctlCommands := []string{"info", "pause", "resume", "snapshot", "migrate", "replicate", "unreplicate", "stats", "metrics"}
	ctlHelp, _, _ := govmm(t, time.Minute, "help", "ctl")
	for _, c := range ctlCommands {
		require.Regexp(t, `(?m)^  `+c+`\b`, ctlHelp, "govmm help ctl")
		require.Regexp(t, `\b`+c+`\b`, out, "govmm help")
	}

	// Each command's help, three ways, the same text on stdout.
	for _, cmd := range [][]string{{"run"}, {"standby"}, {"restore"}, {"witness"}, {"image"}, {"image", "build"}, {"bench"}, {"lab"},
		{"version"}, {"ctl"}, {"ctl", "info"}, {"ctl", "replicate"}, {"ctl", "migrate"}, {"ctl", "unreplicate"}, {"ctl", "metrics"}} {
		want, errOut, status := govmm(t, time.Minute, append([]string{"help"}, cmd...)...)
		require.Equal(t, 0, status, "help %q: %s", cmd, errOut)
		require.Empty(t, errOut)
		require.True(t, strings.HasPrefix(want, "Usage: govmm "), "help %q: %s", cmd, want)
		for _, h := range []string{"-h", "--help"} {
			got, errOut, status := govmm(t, time.Minute, append(cmd, h)...)
			require.Equal(t, 0, status, "%q %s", cmd, h)
			require.Empty(t, errOut)
			require.Equal(t, want, got, "%q %s", cmd, h)
		}
		require.NotRegexp(t, `(?m)^\s+-[a-z]`, want, "help %q writes a flag with one dash", cmd)
	}
	run, _, _ := govmm(t, time.Minute, "help", "run")
	require.Regexp(t, `(?m)^  --api-sock socket$`, run)
	require.Regexp(t, `(?m)^  --epoch duration$`, run)
	require.Contains(t, run, "(default 25ms)")
	for _, l := range strings.Split(run, "\n") {
		require.LessOrEqual(t, len([]rune(l)), 80, "help run: line too long: %q", l)
	}
	// help run | grep works: help is on stdout.
	cmd := exec.Command("sh", "-c", fmt.Sprintf("%s help run | grep -c -- --failover-timeout", govmmBin))
	b, err := cmd.Output()
	require.NoError(t, err)
	require.NotEqual(t, "0", strings.TrimSpace(string(b)))
}

// govmm --version and govmm version: the version, the commit when the
// build knows it, and the Go toolchain.
func TestCLIVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"version"}, {"-version"}} {
		out, errOut, status := govmm(t, time.Minute, args...)
		require.Equal(t, 0, status, errOut)
		require.Empty(t, errOut)
		require.Regexp(t, `^govmm \S+.*, `+regexp.QuoteMeta(runtime.Version())+` linux/amd64\n$`, out)
	}
}

// ctl's default socket is a VM's of the default name, and a VM's default
// socket follows its --name.
func TestSocketPathFor(t *testing.T) {
	t.Setenv("GOVMM_API_SOCK", "")
	require.Equal(t, "govmm.sock", filepath.Base(ctlapi.DefaultSocketPath()))
	require.Equal(t, filepath.Join(filepath.Dir(ctlapi.DefaultSocketPath()), "web.sock"), ctlapi.SocketPathFor("web"))
	t.Setenv("GOVMM_API_SOCK", "/tmp/x.sock")
	require.Equal(t, "/tmp/x.sock", ctlapi.SocketPathFor("web"))
	require.Equal(t, "/tmp/x.sock", ctlapi.DefaultSocketPath())
}

// govmmEnv runs the binary with extra environment and returns stdout,
// stderr and the exit status.
func govmmEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, govmmBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), errOut.String(), ee.ExitCode()
	}
	require.NoError(t, err, errOut.String())
	return out.String(), errOut.String(), 0
}

// run serves the control API by default where ctl looks by default (the
// README's 'govmm ctl stats' after a plain 'govmm run'); a second VM of
// the same default is refused and told how to choose; --api-sock ”
// serves none. The control API's migrate and replicate of a VMM without a
// key say so, without a --key-file hint that ctl could not follow.
func TestCLIDefaultAPISocket(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	halt := filepath.Join(dir, "halt")
	require.NoError(t, os.WriteFile(halt, bench.TinyKernel(false), 0o644))
	_, initrd := tinyImage(t)
	sock := filepath.Join(dir, "default.sock")
	env := []string{"GOVMM_API_SOCK=" + sock}
	vm := exec.Command(govmmBin, "run", "--kernel", halt, "--initrd", initrd, "--mem", "64M", "--net", "none")
	vm.Env = append(os.Environ(), env...)
	var vmLog logBuffer
	vm.Stdout, vm.Stderr = &vmLog, &vmLog
	vm.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, vm.Start())
	t.Cleanup(func() { _ = syscall.Kill(-vm.Process.Pid, syscall.SIGKILL); _ = vm.Wait() })
	waitSocket(t, sock)

	out, errOut, status := govmmEnv(t, env, "ctl", "stats")
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "govmm_uptime_seconds")
	out, _, status = govmmEnv(t, env, "ctl", "info")
	require.Equal(t, 0, status)
	require.Regexp(t, `(?m)^state\s+running$`, out)

	_, errOut, status = govmmEnv(t, env, "run", "--kernel", halt, "--initrd", initrd, "--mem", "64M", "--net", "none")
	require.Equal(t, 1, status, errOut)
	require.Equal(t, fmt.Sprintf("govmm: --api-sock: api socket %s: socket in use: another server is listening there ($GOVMM_API_SOCK: give --api-sock PATH, or --api-sock '' for none)", sock), firstLine(errOut))
	k, i := tinyImage(t)
	_, errOut, status = govmmEnv(t, env, "run", "--kernel", k, "--initrd", i, "--mem", "64M", "--net", "none", "--api-sock", "")
	require.Equal(t, 0, status, "--api-sock '' serves none, so nothing is in use: %s", errOut)

	for _, c := range []struct{ args, line string }{
		{"migrate", "govmm: migrate to 10.0.0.2:7000: invalid request: without a key, the stream uses only loopback addresses (10.0.0.2 is not one); this VMM was started without --key-file"},
		{"replicate", "govmm: replicate to 10.0.0.2:7000: invalid request: without a key, the stream uses only loopback addresses (10.0.0.2 is not one); this VMM was started without --key-file"},
	} {
		_, errOut, status := govmmEnv(t, env, "ctl", c.args, "--to", "10.0.0.2:7000")
		require.Equal(t, 1, status, errOut)
		require.Equal(t, c.line+"\n", errOut)
	}
	_, errOut, status = govmmEnv(t, env, "ctl", "replicate", "--to", "127.0.0.1:1", "--epoch", "-1s")
	require.Equal(t, usageStatus, status, errOut)
	// The VMM checks an epoch that reaches it through the API as run
	// checks --epoch.
	c := ctlapi.NewClient(sock)
	defer c.Close()
	for _, epoch := range []string{"0", "-1s", "25"} {
		err := c.Replicate(t.Context(), ctlapi.ReplicateRequest{To: "127.0.0.1:1", Epoch: epoch}, nil)
		require.ErrorIs(t, err, ctlapi.ErrInvalid, epoch)
		_, want := parseEpoch(epoch)
		require.ErrorContains(t, err, fmt.Sprintf("epoch %q: %v", epoch, want))
	}
	// And an epoch_max as run checks --epoch-max, not below the epoch.
	for _, em := range []string{"-1s", "25"} {
		err := c.Replicate(t.Context(), ctlapi.ReplicateRequest{To: "127.0.0.1:1", EpochMax: em}, nil)
		require.ErrorIs(t, err, ctlapi.ErrInvalid, em)
		_, want := parseMaxEpoch(em)
		require.ErrorContains(t, err, fmt.Sprintf("epoch_max %q: %v", em, want))
	}
	err := c.Replicate(t.Context(), ctlapi.ReplicateRequest{To: "127.0.0.1:1", Epoch: "50ms", EpochMax: "20ms"}, nil)
	require.ErrorIs(t, err, ctlapi.ErrInvalid)
	require.ErrorContains(t, err, "epoch_max 20ms below the epoch 50ms")
	require.NotContains(t, vmLog.String(), "WITHOUT A WITNESS", "refused requests warn of nothing")
	requireNoTrace(t, vmLog.String())
}

// The log handler writes slog records as govmm's other lines read.
func TestCLIHandler(t *testing.T) {
	var b bytes.Buffer
	log := slog.New(newCLIHandler(&b, slog.LevelInfo)).With("component", "replicate")
	log.Warn("stream refused", "err", "bad key", "epoch", 3)
	log.Error("stopped", "why", "x=y")
	log.Info("protected")
	log.Debug("hidden")
	log.WithGroup("g").Info("grouped", "k", 1)
	require.Equal(t, `govmm: warning: stream refused component=replicate err="bad key" epoch=3
govmm: error: stopped component=replicate why="x=y"
govmm: protected component=replicate
govmm: grouped component=replicate g.k=1
`, b.String())
}

// No flag value reaches a panic: every flag of every command (hidden
// ones too) is set to odd values, then an undefined flag ends the
// command line, so that each value goes through its flag's Set and the
// command stops at a usage error before it does anything. In process: a
// panic fails the test.
func TestCLINoTraceFromAnyFlag(t *testing.T) {
	cmds := [][]string{{"run"}, {"standby"}, {"restore"}, {"witness"}, {"image", "build"}, {"bench"}, {"lab"},
		{"ctl"}, {"ctl", "info"}, {"ctl", "snapshot"}, {"ctl", "migrate"}, {"ctl", "replicate"}}
	values := []string{"", "0", "-1", "-1s", "x", "1e400", "99999999999999999999", "1:2:3", "a/b", "\x00", ":", "tap:", "256Q", "1T", "0x10"}
	flagLine := regexp.MustCompile(`(?m)^  --([a-z0-9-]+)`)
	tried := 0
	for _, cmd := range cmds {
		help, _, status := govmm(t, time.Minute, append([]string{"help"}, cmd...)...)
		require.Equal(t, 0, status)
		var names []string
		for _, m := range flagLine.FindAllStringSubmatch(help, -1) {
			names = append(names, m[1])
		}
		if cmd[0] == "run" || cmd[0] == "standby" {
			for n := range hiddenFlags {
				names = append(names, n)
			}
		}
		require.NotEmpty(t, names, "govmm help %q lists flags", cmd)
		for _, name := range names {
			for _, v := range values {
				args := append(slices.Clone(cmd), "--"+name+"="+v, "--no-such-flag-here")
				var err error
				require.NotPanics(t, func() { err = dispatch(args) }, "govmm %q", args)
				var ue *usageError
				require.ErrorAs(t, err, &ue, "govmm %q", args)
				require.NotContains(t, ue.Error(), "\n", "govmm %q: one line", args)
				tried++
			}
		}
	}
	// Odd arguments where a command takes none, or a name.
	for _, cmd := range [][]string{{"run"}, {"standby"}, {"witness"}, {"image"}, {"image", "build"}, {"bench"}, {"version"},
		{"ctl"}, {"ctl", "info"}, {"ctl", "pause"}, {"ctl", "stats"}, {"help"}, {"help", "ctl"}, {"help", "image"}, {}} {
		for _, v := range values {
			args := append(slices.Clone(cmd), v)
			var err error
			require.NotPanics(t, func() { err = dispatch(args) }, "govmm %q", args)
			var ue *usageError
			require.ErrorAs(t, err, &ue, "govmm %q", args)
			tried++
		}
	}
	t.Logf("%d command lines", tried)
}

// A command line shown for the user to type again keeps each argument
// whole: quoted where it is empty or holds a space or a quote.
func TestShellJoin(t *testing.T) {
	require.Equal(t, `govmm run --cmdline "console=ttyS0 quiet" "" -- sh -c "echo 'hi'"`,
		shellJoin([]string{"govmm", "run", "--cmdline", "console=ttyS0 quiet", "", "--", "sh", "-c", "echo 'hi'"}))
}

// --read-spin 0 and --ack-spin 0 are "never poll", which stream.Config
// spells negative (its 0 is the default spin).
func TestStreamSpin(t *testing.T) {
	assert.Equal(t, time.Duration(-1), streamSpin(0))
	assert.Equal(t, 250*time.Microsecond, streamSpin(250*time.Microsecond))
	assert.NoError(t, stream.CheckSpin(0))
	assert.NoError(t, stream.CheckSpin(stream.DefaultReadSpin))
	assert.NoError(t, stream.CheckSpin(300*time.Microsecond))
}
