package main

import (
	"bufio"
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/replicate/stream"
)

// readmeCommands are the commands of README.md's ```sh blocks, one per
// line: continuation lines joined, comments and blank lines dropped.
func readmeCommands(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	var cmds []string
	in, cont := false, ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "```sh":
			in = true
			continue
		case strings.HasPrefix(line, "```"):
			in = false
			continue
		case !in:
			continue
		}
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		if strings.HasSuffix(line, "\\") {
			cont += strings.TrimSuffix(line, "\\")
			continue
		}
		line = cont + line
		cont = ""
		// A comment after the command: "  # ..." (never inside quotes in
		// the README).
		if i := strings.Index(line, " #"); i >= 0 {
			line = line[:i]
		}
		cmds = append(cmds, strings.Join(strings.Fields(line), " "))
	}
	require.NoError(t, sc.Err())
	return cmds
}

// readmeElsewhere are the README's commands that this test does not run,
// with the tests that run them (in the lab where they boot the default
// guest; each name is checked to exist) or why not.
var readmeElsewhere = map[string][]string{
	"make demo":                       {"scripts/demo.sh, which make demo runs (in the lab where this host cannot boot Linux)"},
	"make test":                       {"CI runs it"},
	"make build":                      {"make test builds bin/govmm this way first (its build prerequisite)"},
	"bin/govmm run --cpus 2 -- nproc": {"TestGuestCommandOutputExact"},
	"bin/govmm run --publish 8080:80 --disk disk.img":                                        {"TestGuestDemoUserNetAndDiskPersistence"},
	"bin/govmm run --boot-trace":                                                             {"TestGuestDemoUserNetAndDiskPersistence"},
	"bin/govmm run --net tap:tap0 --guest-ip 10.77.0.2/24 --guest-gw 10.77.0.1":              {"TestGuestDemoOverTAP"},
	`bin/govmm run --kernel bzImage --initrd initrd.img --cmdline "console=ttyS0"`:           {"TestRunTinyKernel"}, // your own kernel: the tiny one here
	"bin/govmm bench boot":                                                                   {"TestQuickSuitesProduceOutput"},
	"bin/govmm run --api-sock /tmp/vm.sock --disk disk.img":                                  {"TestGuestSnapshotRestore"},
	"bin/govmm ctl --api-sock /tmp/vm.sock snapshot --out vm.snap":                           {"TestGuestSnapshotRestore", "TestCtlSnapshotAndRestore"},
	"bin/govmm restore vm.snap":                                                              {"TestGuestSnapshotRestore", "TestCtlSnapshotAndRestore"},
	"bin/govmm ctl --api-sock /tmp/vm.sock migrate --to 127.0.0.1:7000":                      {"TestGuestMigrateUnderLoad", "TestCtlMigrate"},
	"bin/govmm witness --listen 10.0.0.3:7100 --key-file psk --state /var/lib/govmm-witness": {"TestGuestFencingStoppedPrimary", "TestWitnessCommand"}, // three hosts: the lab test puts them in namespaces
	"bin/govmm standby --listen 10.0.0.2:7000 --key-file psk --witness 10.0.0.3:7100 --disk standby-copy.img --net tap:tap0 --api-sock /run/govmm/standby.sock": {"TestGuestFencingStoppedPrimary", "TestGuestFencingLinkCut"},
	"bin/govmm run --replicate-to 10.0.0.2:7000 --key-file psk --witness 10.0.0.3:7100 --epoch 25ms --disk disk.img --net tap:tap0":                             {"TestGuestFencingStoppedPrimary", "TestGuestFencingLinkCut"},
	"bin/govmm ctl --api-sock /run/govmm/standby.sock info": {"TestGuestFencingStoppedPrimary"},
	"bin/govmm run":       {"TestGuestReadmeShellAndCtlStats"},
	"bin/govmm ctl stats": {"TestGuestReadmeShellAndCtlStats", "TestCLIDefaultAPISocket"},
}

// Every command of the README runs as written: here, those that need no
// guest, in a fresh directory with bin/govmm, in the README's order (a
// command ending in & runs until it says that it listens); the others
// are run by the tests readmeElsewhere names. A README command in
// neither list fails the test, so the README cannot drift from it.
func TestReadmeCommands(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	require.NoError(t, os.Symlink(govmmBin, filepath.Join(dir, "bin", "govmm")))
	checks := map[string]func(t *testing.T, stdout string){
		"bin/govmm --version": func(t *testing.T, out string) { require.Regexp(t, `^govmm \S+`, out) },
		"bin/govmm help run":  func(t *testing.T, out string) { require.Contains(t, out, "  --replicate-to HOST:PORT") },
		"bin/govmm image build --print": func(t *testing.T, out string) {
			paths := strings.Fields(out)
			require.Len(t, paths, 3, out) // bzImage, initrd, vmlinux
			for _, p := range paths {
				require.FileExists(t, p)
			}
		},
		"truncate -s 1G disk.img":         func(t *testing.T, _ string) { requireSize(t, filepath.Join(dir, "disk.img"), 1<<30) },
		"truncate -s 1G standby-copy.img": func(t *testing.T, _ string) { requireSize(t, filepath.Join(dir, "standby-copy.img"), 1<<30) },
		"(umask 077; head -c 32 /dev/urandom > psk)": func(t *testing.T, _ string) {
			key, err := stream.LoadKey(filepath.Join(dir, "psk"))
			require.NoError(t, err, "the README's key file is one the stream takes")
			require.Len(t, key, 32, "all 32 random bytes, trailing 0x0a or 0x20 included")
		},
		"bin/govmm standby --listen 127.0.0.1:7000 --disk standby-copy.img &": nil, // runs until it listens
	}
	source := testSources(t)
	ran := 0
	for _, c := range readmeCommands(t) {
		if where, ok := readmeElsewhere[c]; ok {
			for _, w := range where {
				if strings.HasPrefix(w, "Test") {
					require.Regexp(t, `func `+regexp.QuoteMeta(w)+`\(`, source, "%q: no test %s", c, w)
				}
			}
			continue
		}
		check, ok := checks[c]
		require.True(t, ok, "README command %q: neither run here nor covered elsewhere (readmeElsewhere)", c)
		t.Run(c, func(t *testing.T) {
			if bg, ok := strings.CutSuffix(c, " &"); ok {
				runUntilListening(t, dir, bg)
				return
			}
			cmd := exec.Command("sh", "-c", c)
			cmd.Dir = dir
			var out, errOut bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errOut
			require.NoError(t, cmd.Run(), "%s: %s", c, errOut.String())
			check(t, out.String())
		})
		ran++
	}
	require.Equal(t, len(checks), ran, "every command this test knows is still in the README")
}

// runUntilListening starts the README's background command and waits
// until it says that it listens, then stops it.
func runUntilListening(t *testing.T, dir, c string) {
	cmd := exec.Command("sh", "-c", "exec "+c)
	cmd.Dir = dir
	var log logBuffer
	cmd.Stdout, cmd.Stderr = &log, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	defer func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); _ = cmd.Wait() }()
	require.Eventually(t, func() bool { return strings.Contains(log.String(), "listening on") }, 30*time.Second, 10*time.Millisecond,
		"%s: %s", c, log.String())
}

func requireSize(t *testing.T, path string, size int64) {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, size, st.Size())
}

// testSources is the text of the test files the README's commands are
// covered by: this package's and bench's.
func testSources(t *testing.T) string {
	var b strings.Builder
	for _, pattern := range []string{"*_test.go", "../../bench/*_test.go", "../../replicate/*_test.go"} {
		files, err := filepath.Glob(pattern)
		require.NoError(t, err)
		for _, f := range files {
			s, err := os.ReadFile(f)
			require.NoError(t, err)
			b.Write(s)
		}
	}
	return b.String()
}

// The README's commands that need the default guest and that no other
// test runs as written: 'bin/govmm run' gives a shell on the console
// (fed here by a pipe), and a bare 'bin/govmm ctl stats' finds that VM's
// control API at the default socket ($GOVMM_API_SOCK, which TestMain
// points into a temporary directory). One boot of the default guest.
func TestGuestReadmeShellAndCtlStats(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	cmd := exec.Command(govmmBin, "run")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	g := startGuest(t, cmd)

	out, errOut, status := govmm(t, time.Minute, "ctl", "stats")
	require.Equal(t, 0, status, errOut)
	require.Regexp(t, `(?m)^METRIC\s+LABELS\s+VALUE$`, out)
	require.Contains(t, out, "govmm_uptime_seconds")

	// The shell starts just after the ready line and may miss a line
	// typed before it reads: type until its answer shows.
	require.Eventually(t, func() bool {
		if _, err := io.WriteString(stdin, "echo readme-$((6*7))\n"); err != nil {
			return false // the VMM is gone: the wait below says so
		}
		return strings.Contains(g.console.String(), "readme-42")
	}, 2*time.Minute, time.Second, "the shell on the console never answered")
	_, err = io.WriteString(stdin, "poweroff\n")
	require.NoError(t, err)
	select {
	case err := <-g.done:
		require.NoError(t, err, "poweroff ends govmm run with status 0")
	case <-time.After(2 * time.Minute):
		t.Fatal("the guest did not power off")
	}
}

// Every relative link of the README and docs/ names a file of this
// repository, and an #anchor one of its headings (as GitHub makes them).
func TestDocLinks(t *testing.T) {
	docs, err := filepath.Glob("../../docs/*.md")
	require.NoError(t, err)
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	for _, doc := range append(docs, "../../README.md") {
		b, err := os.ReadFile(doc)
		require.NoError(t, err)
		for _, m := range link.FindAllStringSubmatch(string(b), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, anchor, _ := strings.Cut(target, "#")
			path := doc
			if file != "" {
				path = filepath.Join(filepath.Dir(doc), file)
			}
			_, err := os.Stat(path)
			require.NoError(t, err, "%s links %s", doc, target)
			if anchor != "" {
				text, err := os.ReadFile(path)
				require.NoError(t, err)
				require.Contains(t, headingAnchors(string(text)), anchor, "%s links %s", doc, target)
			}
		}
	}
}

// headingAnchors are the anchors GitHub gives a markdown file's headings:
// lower case, spaces to hyphens, punctuation other than - and _ dropped.
func headingAnchors(md string) []string {
	var out []string
	for _, l := range strings.Split(md, "\n") {
		h := strings.TrimLeft(l, "#")
		if h == l || !strings.HasPrefix(h, " ") {
			continue
		}
		var b strings.Builder
		for _, r := range strings.ToLower(strings.TrimSpace(h)) {
			switch {
			case r == ' ':
				b.WriteRune('-')
			case r == '-' || r == '_' || r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r > 127:
				b.WriteRune(r)
			}
		}
		out = append(out, b.String())
	}
	return out
}
