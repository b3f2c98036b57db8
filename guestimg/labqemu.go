package guestimg

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The lab's emulator on a Debian 12 host (lab.QEMUAuto, govmm lab
// --qemu backports).
//
// Debian 12's own QEMU (7.2) emulates AMD SVM well enough to boot the lab,
// with faults that later QEMUs do not have: the upper lane of a 256-bit
// VAESENC is a copy of the lower one (AEGIS-128X2 fails its known-answer
// test in L1), and (our reading of one CI failure) a guest may stop
// taking its timer interrupt, a vector pending with IF set and nothing
// in service, for minutes. Debian's bookworm-backports carries the QEMU
// of Debian 13 built for Debian 12, against Debian 12's own libraries,
// the ones qemu-system-x86 7.2 installs: LabQEMU fetches it into the
// cache, beside the L1 image, without touching the host's apt sources or
// installed packages (docs/ARCHITECTURE.md, "The lab", "Which QEMU").

// ErrLabQEMUNotNeeded is LabQEMU's answer on a host that is not Debian 12:
// its own qemu-system-x86_64 is the one to use (bookworm-backports'
// packages are built for Debian 12 only).
var ErrLabQEMUNotNeeded = errors.New("this host's own QEMU is the lab's")

// LabQEMUSuite is the Debian suite LabQEMU takes QEMU from, and
// labQEMUPackages what it takes: the emulator, its common files (the
// helper binaries' and modules' packages, which qemu-system-x86
// depends on) and its firmware and option ROMs.
const LabQEMUSuite = "bookworm-backports"

var labQEMUPackages = []string{"qemu-system-x86", "qemu-system-common", "qemu-system-data"}

// labQEMUMirror is the archive LabQEMU asks; GOVMM_LAB_QEMU_MIRROR sets
// another (a local mirror of Debian).
const labQEMUMirror = "http://deb.debian.org/debian"

// Emulator is a QEMU for the lab: the binary and the directories of its
// firmware, in the order QEMU is to search them (-L each).
type Emulator struct {
	Binary   string
	DataDirs []string
	// Env is what the binary's environment needs beyond the caller's:
	// QEMU_MODULE_DIR, so that it loads its own modules, not the
	// system QEMU's.
	Env     []string
	Version string // what the binary says of itself ("10.0.2 (Debian ...)")
	Suite   string // the Debian suite it came from
}

// labQEMUManifest is written last into the emulator's directory: a
// directory without it is an unfinished fetch.
type labQEMUManifest struct {
	Suite    string
	Packages []string
	Version  string
}

// ErrLabQEMUFailedRecently is LabQEMU's answer, wrapped with when and
// why, while a fetch from the same mirror failed less than
// LabQEMURetryAfter ago: an offline host would otherwise wait for
// apt-get's retries (about 7 s) at every L1 boot before falling back.
var ErrLabQEMUFailedRecently = errors.New("the last fetch of the lab's QEMU failed recently")

// LabQEMURetryAfter is how long LabQEMU remembers a failed fetch.
const LabQEMURetryAfter = time.Hour

// labQEMUFailure is what <cache>/lab/qemu.failed remembers of a failed
// fetch.
type labQEMUFailure struct {
	Mirror string
	At     time.Time
	Error  string
}

// LabQEMU returns the lab's emulator on a Debian 12 host: QEMU from
// LabQEMUSuite, fetched once into <cache>/lab/qemu (about 15 MB) with
// apt-get's own download under a private source list. Elsewhere it
// returns ErrLabQEMUNotNeeded. A fetch that fails returns its error, and
// the caller decides whether Debian 12's QEMU will do; the failure is
// remembered (<cache>/lab/qemu.failed), and for LabQEMURetryAfter a
// call for the same mirror returns ErrLabQEMUFailedRecently at once
// instead of fetching again, unless retry is set.
func LabQEMU(ctx context.Context, opts Options, retry bool) (Emulator, error) {
	if !LabQEMUWanted() {
		return Emulator{}, ErrLabQEMUNotNeeded
	}
	b, err := newBuilder(Options{CacheDir: opts.CacheDir, Log: opts.Log})
	if err != nil {
		return Emulator{}, err
	}
	dir := filepath.Join(b.cache, "lab", "qemu")
	if e, ok := cachedLabQEMU(dir); ok {
		return e, nil
	}
	mirror := labQEMUMirrorNow()
	failed := dir + ".failed"
	recent := func() error {
		f, ok := recentLabQEMUFailure(failed, mirror, time.Now())
		if !ok || retry {
			return nil
		}
		return fmt.Errorf("%w: %s ago from %s (%s); not tried again until %s, or at once with govmm lab --qemu backports, or once %s is removed",
			ErrLabQEMUFailedRecently, time.Since(f.At).Round(time.Second), f.Mirror, f.Error,
			f.At.Add(LabQEMURetryAfter).Format(time.TimeOnly), failed)
	}
	if err := recent(); err != nil {
		return Emulator{}, err
	}
	unlock, err := b.lock(ctx)
	if err != nil {
		return Emulator{}, err
	}
	defer unlock()
	if e, ok := cachedLabQEMU(dir); ok {
		return e, nil
	}
	if err := recent(); err != nil { // another process's fetch, while this one waited
		return Emulator{}, err
	}
	if err := b.fetchLabQEMU(ctx, dir, mirror); err != nil {
		if ctx.Err() == nil { // a fetch cut short says nothing of the mirror
			rememberLabQEMUFailure(failed, labQEMUFailure{Mirror: mirror, At: time.Now(), Error: err.Error()})
		}
		return Emulator{}, fmt.Errorf("fetch the lab's QEMU from %s: %w", LabQEMUSuite, err)
	}
	_ = os.Remove(failed) // fetched: nothing to remember
	e, ok := cachedLabQEMU(dir)
	if !ok {
		return Emulator{}, errors.New("fetch the lab's QEMU: no usable QEMU after the fetch")
	}
	return e, nil
}

// labQEMUMirrorNow is the archive a fetch asks: GOVMM_LAB_QEMU_MIRROR,
// or labQEMUMirror.
func labQEMUMirrorNow() string {
	if m := os.Getenv("GOVMM_LAB_QEMU_MIRROR"); m != "" {
		return m
	}
	return labQEMUMirror
}

// recentLabQEMUFailure returns the failure the file remembers if it was
// a fetch from mirror less than LabQEMURetryAfter before now. A file
// that does not parse, or a failure dated in the future (a clock set
// back), is none.
func recentLabQEMUFailure(file, mirror string, now time.Time) (labQEMUFailure, bool) {
	b, err := os.ReadFile(file)
	if err != nil {
		return labQEMUFailure{}, false
	}
	var f labQEMUFailure
	if json.Unmarshal(b, &f) != nil || f.Mirror != mirror || f.At.After(now) || now.Sub(f.At) >= LabQEMURetryAfter {
		return labQEMUFailure{}, false
	}
	return f, true
}

// rememberLabQEMUFailure writes f into file, best effort: a cache that
// cannot take it only means the next call fetches again.
func rememberLabQEMUFailure(file string, f labQEMUFailure) {
	b, _ := json.Marshal(f)
	_ = writeFileAtomic(file, b, 0o644)
}

// LabQEMUWanted says whether LabQEMU fetches a QEMU here: on Debian 12
// (bookworm, from /etc/os-release).
func LabQEMUWanted() bool {
	f, err := os.Open("/etc/os-release")
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if k, v, ok := strings.Cut(s.Text(), "="); ok && k == "VERSION_CODENAME" {
			return strings.Trim(v, `"'`) == "bookworm"
		}
	}
	return false
}

// cachedLabQEMU returns the emulator in dir if its manifest is there and
// current.
func cachedLabQEMU(dir string) (Emulator, bool) {
	b, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return Emulator{}, false
	}
	var m labQEMUManifest
	if json.Unmarshal(b, &m) != nil || m.Suite != LabQEMUSuite || !slices.Equal(m.Packages, labQEMUPackages) {
		return Emulator{}, false
	}
	e := labEmulator(filepath.Join(dir, "root"))
	if _, err := os.Stat(e.Binary); err != nil {
		return Emulator{}, false
	}
	e.Version, e.Suite = m.Version, m.Suite
	return e, true
}

// labEmulator is the emulator unpacked under root: its own firmware first,
// then the system's (SeaBIOS's images, which qemu-system-data links to
// from Debian's seabios package, installed with the system's QEMU).
func labEmulator(root string) Emulator {
	return Emulator{
		Binary:   filepath.Join(root, "usr", "bin", "qemu-system-x86_64"),
		DataDirs: []string{filepath.Join(root, "usr", "share", "qemu"), "/usr/share/qemu", "/usr/share/seabios"},
		Env:      []string{"QEMU_MODULE_DIR=" + filepath.Join(root, "usr", "lib", "x86_64-linux-gnu", "qemu")},
	}
}

// fetchLabQEMU downloads labQEMUPackages from LabQEMUSuite and unpacks
// them into dir/root, checks that the binary runs (every library it
// needs is on the host), and writes the manifest last.
func (b *builder) fetchLabQEMU(ctx context.Context, dir, mirror string) error {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return ErrNoApt
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "qemu-download-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	lists := filepath.Join(tmp, "lists")
	if err := os.MkdirAll(filepath.Join(lists, "partial"), 0o755); err != nil {
		return err
	}
	sources := filepath.Join(tmp, "sources.list")
	if err := os.WriteFile(sources, []byte("deb "+mirror+" "+LabQEMUSuite+" main\n"), 0o644); err != nil {
		return err
	}
	// apt-get with this source list alone, its lists and caches in tmp:
	// the host's own lists, sources and packages stay as they are.
	apt := func(args ...string) ([]byte, error) {
		opts := []string{
			"-q",
			"-o", "Dir::Etc::SourceList=" + sources,
			"-o", "Dir::Etc::SourceParts=" + filepath.Join(tmp, "none"),
			"-o", "Dir::State::Lists=" + lists,
			"-o", "Dir::Cache=" + tmp,
			"-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
			"-o", "APT::Sandbox::User=root",
		}
		cmd := exec.CommandContext(ctx, "apt-get", append(opts, args...)...)
		cmd.Dir = tmp
		out, err := cmd.CombinedOutput()
		if err != nil {
			return out, fmt.Errorf("apt-get %s: %w: %s", args[0], err, lastLines(out, 5))
		}
		return out, nil
	}
	b.logf("fetching the lab's QEMU from %s (%s)", LabQEMUSuite, mirror)
	out, err := apt("update")
	if err != nil {
		return err
	}
	// apt-get update succeeds even when it fetched nothing (a mirror
	// that cannot be reached is a warning); what it says then is the
	// cause, not download's "Release not found".
	if rel, _ := filepath.Glob(filepath.Join(lists, "*Release")); len(rel) == 0 {
		return fmt.Errorf("apt-get update: no release file from %s: %s", mirror, lastLines(out, 3))
	}
	specs := make([]string, len(labQEMUPackages))
	for i, p := range labQEMUPackages {
		specs[i] = p + "/" + LabQEMUSuite
	}
	if _, err := apt(append([]string{"download"}, specs...)...); err != nil {
		return err
	}
	debs, err := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if err != nil || len(debs) != len(labQEMUPackages) {
		return fmt.Errorf("apt-get download: %d packages came, want %d", len(debs), len(labQEMUPackages))
	}
	root := filepath.Join(tmp, "root")
	for _, d := range debs {
		if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", d, root).CombinedOutput(); err != nil {
			return fmt.Errorf("dpkg-deb -x %s: %w: %s", filepath.Base(d), err, lastLines(out, 3))
		}
	}
	e := labEmulator(root)
	ver := exec.CommandContext(ctx, e.Binary, "--version")
	ver.Env = append(os.Environ(), e.Env...)
	out, err = ver.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s --version (a library it needs missing?): %w: %s", e.Binary, err, lastLines(out, 3))
	}
	version, _ := strings.CutPrefix(strings.SplitN(string(out), "\n", 2)[0], "QEMU emulator version ")
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Rename(root, filepath.Join(dir, "root")); err != nil {
		return err
	}
	m, _ := json.Marshal(labQEMUManifest{Suite: LabQEMUSuite, Packages: labQEMUPackages, Version: version})
	if err := os.WriteFile(filepath.Join(dir, manifestName), m, 0o644); err != nil {
		return err
	}
	b.logf("the lab's QEMU: %s, in %s", version, dir)
	return nil
}
