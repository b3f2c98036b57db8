package guestimg

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrNoApt is returned when packages must be downloaded and the host has no
// apt-get.
var ErrNoApt = errors.New("apt-get not found: the default guest image is built from Debian packages " +
	"(linux-image-amd64, busybox-static, e2fsprogs); run on a Debian or Ubuntu host with apt, " +
	"or pass your own --kernel and --initrd")

// ErrNoGo is returned when the guest programs must be compiled and the
// go command is not in PATH.
var ErrNoGo = errors.New("go command not found")

// rootPackages are the packages the image starts from; the kernel
// metapackage is resolved to the versioned kernel package it depends on and
// e2fsprogs pulls in the libraries mke2fs is linked against.
var rootPackages = []string{"linux-image-amd64", "busybox-static", "e2fsprogs"}

// debManifest records which .deb files in <cache>/debs make up the image, so
// that a cached build never has to ask apt. Delete <cache>/debs to pick up
// newer packages.
type debManifest struct {
	Packages []string // rootPackages at the time of download
	Kernel   string   // file name of linux-image-<version>-amd64
	Busybox  string
	E2fs     string
	Libs     []string // shared-library packages that e2fsprogs depends on
}

func (m *debManifest) files() []string {
	return append([]string{m.Kernel, m.Busybox, m.E2fs}, m.Libs...)
}

const manifestName = "manifest.json"

// readManifest returns the manifest in debs if it is current and every file
// it names is present.
func readManifest(debs string) (*debManifest, error) {
	b, err := os.ReadFile(filepath.Join(debs, manifestName))
	if err != nil {
		return nil, err
	}
	var m debManifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read package manifest: %w", err)
	}
	if !slices.Equal(m.Packages, rootPackages) {
		return nil, errors.New("package manifest is for another package set")
	}
	for _, f := range m.files() {
		if f == "" {
			return nil, errors.New("package manifest is incomplete")
		}
		if _, err := os.Stat(filepath.Join(debs, f)); err != nil {
			return nil, fmt.Errorf("package manifest: %w", err)
		}
	}
	return &m, nil
}

// downloadDebs fetches the packages with apt-get into debs and writes the
// manifest last, so a half-finished download is never mistaken for a
// complete one.
func (b *builder) downloadDebs(ctx context.Context, debs string) (*debManifest, error) {
	if _, err := exec.LookPath("apt-get"); err != nil {
		return nil, ErrNoApt
	}
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return nil, fmt.Errorf("create deb cache: %w", err)
	}
	dl, err := os.MkdirTemp(debs, "download-")
	if err != nil {
		return nil, fmt.Errorf("create download dir: %w", err)
	}
	defer os.RemoveAll(dl)

	f := &debFetcher{b: b, ctx: ctx, dir: dl, got: map[string]string{}}
	if err := f.fetch(rootPackages...); err != nil {
		return nil, err
	}
	kernelPkg, kernelSpec, err := kernelPackage(ctx, filepath.Join(dl, f.got["linux-image-amd64"]))
	if err != nil {
		return nil, err
	}
	libs, err := f.fetchLibs(kernelSpec)
	if err != nil {
		return nil, err
	}
	m := &debManifest{
		Packages: rootPackages,
		Kernel:   f.got[kernelPkg],
		Busybox:  f.got["busybox-static"],
		E2fs:     f.got["e2fsprogs"],
	}
	for _, l := range libs {
		m.Libs = append(m.Libs, f.got[l])
	}
	return m, storeDebs(dl, debs, m)
}

// debFetcher downloads packages into dir and remembers which file holds
// which package.
type debFetcher struct {
	b   *builder
	ctx context.Context
	dir string
	got map[string]string // package name -> file name in dir
}

// fetch downloads specs (NAME or NAME=VERSION) and checks that each came.
func (f *debFetcher) fetch(specs ...string) error {
	f.b.logf("downloading %s", strings.Join(specs, " "))
	if err := f.b.aptDownload(f.ctx, f.dir, specs); err != nil {
		return err
	}
	ents, err := os.ReadDir(f.dir)
	if err != nil {
		return fmt.Errorf("list downloads: %w", err)
	}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".deb") || slices.Contains(mapValues(f.got), e.Name()) {
			continue
		}
		pkg, err := debField(f.ctx, filepath.Join(f.dir, e.Name()), "Package")
		if err != nil {
			return err
		}
		f.got[pkg] = e.Name()
	}
	for _, s := range specs {
		name, _, _ := strings.Cut(s, "=")
		if _, ok := f.got[name]; !ok {
			return fmt.Errorf("apt-get download %s: no .deb appeared", s)
		}
	}
	return nil
}

// kernelPackage reads the linux-image-amd64 metapackage at meta, which
// depends on exactly one linux-image-X.Y.Z-N-amd64 (= version): its name,
// and the spec that downloads that version.
func kernelPackage(ctx context.Context, meta string) (pkg, spec string, err error) {
	deps, err := debDepends(ctx, meta)
	if err != nil {
		return "", "", err
	}
	for _, d := range deps {
		if strings.HasPrefix(d.name, "linux-image-") {
			spec = d.name
			if d.exact != "" {
				spec += "=" + d.exact
			}
			return d.name, spec, nil
		}
	}
	return "", "", fmt.Errorf("linux-image-amd64 depends on no linux-image package (depends: %v)", deps)
}

// fetchLibs downloads first (the kernel's spec) together with the shared
// libraries of e2fsprogs, transitively, and returns the libraries' names,
// sorted. Only lib* packages: the rest (logsave, gcc-12-base) hold nothing
// mke2fs loads.
func (f *debFetcher) fetchLibs(first ...string) ([]string, error) {
	var libs []string
	scan := []string{"e2fsprogs"} // packages whose dependencies are not read yet
	specs := first
	for round := 0; ; round++ {
		if round > 10 {
			return nil, errors.New("e2fsprogs library dependencies do not converge")
		}
		var fresh []string
		for _, p := range scan {
			deps, err := debDepends(f.ctx, filepath.Join(f.dir, f.got[p]))
			if err != nil {
				return nil, err
			}
			for _, d := range deps {
				if strings.HasPrefix(d.name, "lib") && !slices.Contains(libs, d.name) {
					libs = append(libs, d.name)
					fresh = append(fresh, d.name)
				}
			}
		}
		specs = append(specs, fresh...)
		if len(specs) == 0 {
			break
		}
		if err := f.fetch(specs...); err != nil {
			return nil, err
		}
		scan, specs = fresh, nil
	}
	slices.Sort(libs)
	return libs, nil
}

// storeDebs moves m's files from dl into debs, then writes the manifest.
func storeDebs(dl, debs string, m *debManifest) error {
	for _, f := range m.files() {
		if err := os.Rename(filepath.Join(dl, f), filepath.Join(debs, f)); err != nil {
			return fmt.Errorf("store package: %w", err)
		}
	}
	js, err := json.MarshalIndent(m, "", "\t")
	if err != nil {
		return fmt.Errorf("encode package manifest: %w", err)
	}
	return writeFileAtomic(filepath.Join(debs, manifestName), append(js, '\n'), 0o644)
}

// aptDownload runs apt-get download in dir. On a machine whose package
// lists are empty it fails with "Unable to locate package": then it runs
// apt-get update once (which needs root) and tries again.
func (b *builder) aptDownload(ctx context.Context, dir string, specs []string) error {
	run := func(args ...string) error {
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("apt-get %s: %w: %s", args[0], err, lastLines(out, 5))
		}
		return nil
	}
	download := func() error {
		if b.progress == nil {
			return run(append([]string{"download", "-q"}, specs...)...)
		}
		total := downloadSize(ctx, dir, specs)
		stop := b.watchDownload(dir, total)
		err := run(append([]string{"download", "-q"}, specs...)...)
		stop(err == nil)
		return err
	}
	err := download()
	if err == nil || b.aptUpdated || ctx.Err() != nil {
		return err
	}
	b.logf("apt-get download failed; running apt-get update once and retrying")
	b.aptUpdated = true
	if uerr := run("update", "-q"); uerr != nil {
		return fmt.Errorf("%w (and then %w)", err, uerr)
	}
	return download()
}

// downloadPoll is how often the download's progress is measured.
const downloadPoll = 250 * time.Millisecond

// downloadSize asks apt what downloading specs into dir will fetch
// (apt-get download --print-uris: one line per package, "'URI' FILE
// SIZE HASH") and returns the bytes, or 0 when apt cannot tell (its
// lists need an update): progress then shows the bytes alone.
func downloadSize(ctx context.Context, dir string, specs []string) int64 {
	cmd := exec.CommandContext(ctx, "apt-get", append([]string{"download", "--print-uris", "-q"}, specs...)...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return 0
	}
	return parsePrintURIs(out)
}

// parsePrintURIs sums the sizes of apt-get --print-uris output.
func parsePrintURIs(out []byte) int64 {
	var total int64
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || !strings.HasPrefix(f[0], "'") {
			continue
		}
		if n, err := strconv.ParseInt(f[2], 10, 64); err == nil && n > 0 {
			total += n
		}
	}
	return total
}

// watchDownload reports the growth of dir's files (apt-get download
// writes each package straight into its final name in the current
// directory) against total every downloadPoll, until the returned
// function is called, which waits for the watcher to end and, after a
// download that succeeded, reports the last state (a failed one is tried
// again, counted afresh).
func (b *builder) watchDownload(dir string, total int64) (stop func(ok bool)) {
	base := dirBytes(dir)
	b.dlTotal += total
	report := func() int64 {
		n := max(dirBytes(dir)-base, 0)
		b.progress(b.dlDone+n, max(b.dlTotal, b.dlDone+n))
		return n
	}
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(downloadPoll)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				report()
			}
		}
	}()
	return func(ok bool) {
		close(quit)
		<-done
		if !ok {
			b.dlTotal -= total
			return
		}
		b.dlDone += report()
	}
}

// dirBytes is the size of the regular files in dir.
func dirBytes(dir string) int64 {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range ents {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
	}
	return n
}

// debField reads one control field of a .deb.
func debField(ctx context.Context, deb, field string) (string, error) {
	out, err := exec.CommandContext(ctx, "dpkg-deb", "-f", deb, field).Output()
	if err != nil {
		return "", fmt.Errorf("dpkg-deb -f %s %s: %w", filepath.Base(deb), field, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// debDep is one entry of a Depends field: the first alternative's name and
// its version when pinned with "=".
type debDep struct {
	name, exact string
}

// debDepends returns the Pre-Depends and Depends of a .deb.
func debDepends(ctx context.Context, deb string) ([]debDep, error) {
	var out []debDep
	for _, field := range []string{"Pre-Depends", "Depends"} {
		v, err := debField(ctx, deb, field)
		if err != nil {
			return nil, err
		}
		out = append(out, parseDepends(v)...)
	}
	return out, nil
}

// parseDepends parses a Debian relationship field such as
// "libc6 (>= 2.34), linux-image-6.1.0-48-amd64 (= 6.1.172-1), a | b",
// keeping the first alternative of each entry.
func parseDepends(v string) []debDep {
	var out []debDep
	for _, ent := range strings.Split(v, ",") {
		alt, _, _ := strings.Cut(ent, "|")
		alt = strings.TrimSpace(alt)
		if alt == "" {
			continue
		}
		name, rest, _ := strings.Cut(alt, " ")
		name, _, _ = strings.Cut(name, ":") // "libfoo:any"
		d := debDep{name: name}
		rest = strings.TrimSpace(rest)
		if strings.HasPrefix(rest, "(=") {
			d.exact = strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(rest, "(="), ")"))
		}
		out = append(out, d)
	}
	return out
}

func mapValues(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// lastLines returns the last n non-empty lines of tool output, for errors.
func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(bytes.ToValidUTF8(b, []byte("?")))), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "; ")
}

// unpack extracts the packages files (names in the debs directory) into
// root, all at once.
func (b *builder) unpack(ctx context.Context, files []string, root string) error {
	start := time.Now()
	b.logf("unpacking %d packages", len(files))
	var wg sync.WaitGroup
	errs := make([]error, len(files))
	for i, f := range files {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.CommandContext(ctx, "dpkg-deb", "-x", filepath.Join(b.debsDir(), f), root)
			if o, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("dpkg-deb -x %s: %w: %s", f, err, lastLines(o, 3))
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	b.logf("unpacked in %v", time.Since(start).Round(time.Millisecond))
	return nil
}
