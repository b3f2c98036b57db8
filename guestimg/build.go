package guestimg

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// builderVersion is part of every cache key. Bump it whenever the builder
// changes what it puts into an image, so that cached images are rebuilt.
const builderVersion = 1

// imageVersion is part of the key of guest images (not of the lab's): bump
// it when the image's contents change but the lab's do not. 2: the image
// holds a vmlinux for PVH boot.
const imageVersion = 2

// baseVersion is part of the key of the guest image's package part (the
// base: kernel, vmlinux, modules, busybox, mke2fs), not of the lab's: bump
// it when what the builder makes of the same packages changes. 2: the
// module list says which device each module is for; the vmlinux is packed
// (TrimVmlinux drops zero pages and alignment gaps).
const baseVersion = 2

// Options configures Build. The zero value is ready to use.
type Options struct {
	// CacheDir holds downloaded packages and built images; default
	// DefaultCacheDir().
	CacheDir string
	// Log receives progress lines; nil discards them.
	Log io.Writer
	// Progress, if set, is told how the package download goes: the bytes
	// apt-get has written so far against the sizes apt announced for the
	// packages asked for so far (the total grows when the kernel and the
	// libraries are asked for, after the first packages are read), about
	// every downloadPoll while apt-get runs, from another goroutine. A
	// cached build downloads nothing and never calls it.
	Progress func(done, total int64)
}

// Image is a bootable guest: absolute paths of the kernel (bzImage), the
// same kernel uncompressed (vmlinux, an ELF file with a PVH entry point:
// govmm boots it without running the decompressor; see ExtractVmlinux and
// TrimVmlinux) and the initramfs (uncompressed newc cpio). The files are
// never modified once Build returned them; append a CommandArchive to a
// copy of the initramfs, or send the two back to back, to use command
// mode.
type Image struct {
	Kernel, Vmlinux, Initrd string
}

// DefaultCacheDir is $GOVMM_CACHE if set, else $XDG_CACHE_HOME/govmm, else
// ~/.cache/govmm.
func DefaultCacheDir() string {
	if d := os.Getenv("GOVMM_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "govmm")
	}
	return filepath.Join(os.TempDir(), "govmm-cache")
}

// Build returns the default guest image, building it if needed. The result
// lives in <cache>/images/<key>/{vmlinuz,initrd.img}, where key hashes the
// .deb files, the guest programs' sources (embedded in this binary, see
// guestSources) and builderVersion; when that
// directory exists Build returns at once, without apt or the network.
// Downloaded packages stay in <cache>/debs (listed by manifest.json; delete
// the directory to pick up newer packages), the part of the image made from
// them in <cache>/parts. Concurrent Builds, in one process or several, are
// serialized by a lock file and never see a half-written image.
func Build(ctx context.Context, opts Options) (Image, error) {
	b, err := newBuilder(opts)
	if err != nil {
		return Image{}, err
	}
	if m, err := readManifest(b.debsDir()); err == nil {
		if img, ok, err := b.cached(m); err != nil || ok {
			return img, err
		}
	}

	unlock, err := b.lock(ctx)
	if err != nil {
		return Image{}, err
	}
	defer unlock()

	b.removeStale()
	start := time.Now()
	m, err := readManifest(b.debsDir())
	if err != nil {
		if m, err = b.downloadDebs(ctx, b.debsDir()); err != nil {
			return Image{}, fmt.Errorf("build guest image: %w", err)
		}
	}
	if img, ok, err := b.cached(m); err != nil || ok {
		return img, err // another process built it while we waited
	}
	img, err := b.build(ctx, m)
	if err != nil {
		return Image{}, fmt.Errorf("build guest image: %w", err)
	}
	b.logf("image ready in %v: %s", time.Since(start).Round(time.Millisecond), filepath.Dir(img.Kernel))
	return img, nil
}

type builder struct {
	cache      string
	log        io.Writer
	aptUpdated bool // apt-get update was tried already
	progress   func(done, total int64)
	// dlDone and dlTotal are the bytes of the downloads finished so far
	// and the sizes announced so far, for progress.
	dlDone, dlTotal int64
}

func newBuilder(opts Options) (*builder, error) {
	b := &builder{cache: opts.CacheDir, log: opts.Log, progress: opts.Progress}
	if b.cache == "" {
		b.cache = DefaultCacheDir()
	}
	var err error
	if b.cache, err = filepath.Abs(b.cache); err != nil {
		return nil, fmt.Errorf("cache dir: %w", err)
	}
	if b.log == nil {
		b.log = io.Discard
	}
	return b, nil
}

func (b *builder) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "guestimg: "+format+"\n", args...)
}

func (b *builder) debsDir() string { return filepath.Join(b.cache, "debs") }

// removeStale deletes temporary directories that a killed builder left
// behind (an unpacked kernel package is about 400 MB). The caller holds the
// lock, so no live builder owns them.
func (b *builder) removeStale() {
	for _, pat := range []string{"debs/download-*", "parts/tmp-*", "images/tmp-*", "tmp/*"} {
		old, _ := filepath.Glob(filepath.Join(b.cache, pat))
		for _, d := range old {
			_ = os.RemoveAll(d)
		}
	}
}

// cached reports the image for m if it is already built.
func (b *builder) cached(m *debManifest) (Image, bool, error) {
	key, err := b.imageKey(m)
	if err != nil {
		return Image{}, false, err
	}
	img := b.imagePaths(key)
	for _, p := range []string{img.Kernel, img.Vmlinux, img.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return Image{}, false, nil
		}
	}
	return img, true, nil
}

func (b *builder) imagePaths(key string) Image {
	dir := filepath.Join(b.cache, "images", key)
	return Image{Kernel: filepath.Join(dir, "vmlinuz"), Vmlinux: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd.img")}
}

// baseKey names the part of the image made from the packages alone.
func (b *builder) baseKey(m *debManifest) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "govmm guestimg base v%d.%d\n", builderVersion, baseVersion)
	for _, f := range m.files() {
		fi, err := os.Stat(filepath.Join(b.debsDir(), f))
		if err != nil {
			return "", fmt.Errorf("hash packages: %w", err)
		}
		// Debian never reuses a file name for other contents, and the
		// name carries the version; the size guards against truncation.
		fmt.Fprintf(h, "deb %s %d\n", f, fi.Size())
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), nil
}

// imageKey names a whole image: packages, the guest programs' sources,
// the Go release this binary was built with (the go command that compiles
// the guest programs is normally the same) and the builder version.
func (b *builder) imageKey(m *debManifest) (string, error) {
	base, err := b.baseKey(m)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "govmm guestimg image v%d.%d %s %s\nbase %s\n", builderVersion, imageVersion, runtime.Version(), runtime.GOARCH, base)
	if err := hashGuestSources(h); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), nil
}

// lock takes <cache>/lock, an exclusive flock, waiting as long as ctx
// allows. The returned function releases it.
func (b *builder) lock(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(b.cache, 0o755); err != nil {
		return nil, fmt.Errorf("create cache dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(b.cache, "lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open cache lock: %w", err)
	}
	for said := false; ; {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock cache: %w", err)
		}
		if !said {
			b.logf("waiting for another build to finish (%s)", f.Name())
			said = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock cache: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// build makes the image for m. The caller holds the lock.
func (b *builder) build(ctx context.Context, m *debManifest) (Image, error) {
	key, err := b.imageKey(m)
	if err != nil {
		return Image{}, err
	}
	// The package part and the Go programs are independent: build them
	// side by side.
	var (
		wg             sync.WaitGroup
		base           string
		baseErr, goErr error
		guestCPIO      []byte
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		base, baseErr = b.ensureBase(ctx, m)
	}()
	guestCPIO, goErr = b.buildGuestPrograms(ctx)
	wg.Wait()
	if err := errors.Join(baseErr, goErr); err != nil {
		return Image{}, err
	}

	images := filepath.Join(b.cache, "images")
	if err := os.MkdirAll(images, 0o755); err != nil {
		return Image{}, fmt.Errorf("create image dir: %w", err)
	}
	tmp, err := os.MkdirTemp(images, "tmp-")
	if err != nil {
		return Image{}, fmt.Errorf("create image dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Image{}, fmt.Errorf("create image dir: %w", err)
	}
	for _, k := range []string{"vmlinuz", "vmlinux"} {
		if err := linkOrCopy(filepath.Join(base, k), filepath.Join(tmp, k)); err != nil {
			return Image{}, err
		}
	}
	baseCPIO, err := os.ReadFile(filepath.Join(base, "base.cpio"))
	if err != nil {
		return Image{}, fmt.Errorf("read base archive: %w", err)
	}
	if err := writeFile(filepath.Join(tmp, "initrd.img"), 0o644, baseCPIO, guestCPIO); err != nil {
		return Image{}, err
	}
	if err := syncDir(tmp); err != nil {
		return Image{}, err
	}
	img := b.imagePaths(key)
	if err := os.Rename(tmp, filepath.Dir(img.Kernel)); err != nil {
		if _, serr := os.Stat(img.Initrd); serr != nil {
			return Image{}, fmt.Errorf("store image: %w", err)
		}
	}
	_ = syncDir(images)
	fi, _ := os.Stat(img.Initrd)
	ki, _ := os.Stat(img.Kernel)
	if fi != nil && ki != nil {
		b.logf("kernel %.1f MiB, initrd %.1f MiB", float64(ki.Size())/(1<<20), float64(fi.Size())/(1<<20))
	}
	return img, nil
}

// ensureBase returns <cache>/parts/base-<key>, holding vmlinuz, the
// vmlinux extracted from it, and base.cpio: everything of the image that comes from Debian packages. It is
// reused by every image built from the same packages.
func (b *builder) ensureBase(ctx context.Context, m *debManifest) (string, error) {
	key, err := b.baseKey(m)
	if err != nil {
		return "", err
	}
	parts := filepath.Join(b.cache, "parts")
	dir := filepath.Join(parts, "base-"+key)
	if _, err := os.Stat(filepath.Join(dir, "base.cpio")); err == nil {
		if _, err := os.Stat(filepath.Join(dir, "vmlinux")); err == nil {
			return dir, nil
		}
		// A base from before PVH: add the vmlinux beside its bzImage.
		if err := b.writeVmlinux(ctx, dir); err != nil {
			return "", err
		}
		return dir, syncDir(dir)
	}
	if err := os.MkdirAll(parts, 0o755); err != nil {
		return "", fmt.Errorf("create parts dir: %w", err)
	}
	tmp, err := os.MkdirTemp(parts, "tmp-")
	if err != nil {
		return "", fmt.Errorf("create parts dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	root, out := filepath.Join(tmp, "root"), filepath.Join(tmp, "out")
	for _, d := range []string{root, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return "", fmt.Errorf("create parts dir: %w", err)
		}
	}

	if err := b.unpack(ctx, m.files(), root); err != nil {
		return "", err
	}
	t, kver, err := b.baseTree(ctx, root)
	if err != nil {
		return "", err
	}
	if err := linkOrCopy(filepath.Join(root, "boot", "vmlinuz-"+kver), filepath.Join(out, "vmlinuz")); err != nil {
		return "", err
	}
	if err := b.writeVmlinux(ctx, out); err != nil {
		return "", err
	}
	if err := writeArchive(filepath.Join(out, "base.cpio"), t); err != nil {
		return "", fmt.Errorf("write base archive: %w", err)
	}
	info, _ := json.MarshalIndent(map[string]any{"kernel": kver, "debs": m.files()}, "", "\t")
	if err := os.WriteFile(filepath.Join(out, "info.json"), info, 0o644); err != nil {
		return "", fmt.Errorf("write base info: %w", err)
	}
	if err := syncDir(out); err != nil {
		return "", err
	}
	if err := os.Rename(out, dir); err != nil {
		return "", fmt.Errorf("store base: %w", err)
	}
	return dir, nil
}

// writeVmlinux extracts the uncompressed kernel from dir/vmlinuz into
// dir/vmlinux, trimmed (TrimVmlinux).
func (b *builder) writeVmlinux(ctx context.Context, dir string) error {
	bz, err := os.ReadFile(filepath.Join(dir, "vmlinuz"))
	if err != nil {
		return fmt.Errorf("read kernel: %w", err)
	}
	elf, err := ExtractVmlinux(ctx, bz)
	if err != nil {
		return err
	}
	if elf, err = TrimVmlinux(elf); err != nil {
		return err
	}
	b.logf("vmlinux for PVH boot: %.1f MiB", float64(len(elf))/(1<<20))
	return writeFileAtomic(filepath.Join(dir, "vmlinux"), elf, 0o644)
}

// linkOrCopy hard-links src to dst, copying when the link fails (another
// file system).
func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("copy %s: %w", filepath.Base(src), err)
	}
	return writeFile(dst, 0o644, data)
}

// writeFile writes the concatenation of parts to name and fsyncs it.
func writeFile(name string, perm fs.FileMode, parts ...[]byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	for _, p := range parts {
		if _, err = f.Write(p); err != nil {
			break
		}
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	return nil
}

// writeFileAtomic writes data to a temporary name and renames it over name.
func writeFileAtomic(name string, data []byte, perm fs.FileMode) error {
	tmp := name + ".tmp"
	if err := writeFile(tmp, perm, data); err != nil {
		return err
	}
	if err := os.Rename(tmp, name); err != nil {
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	return syncDir(filepath.Dir(name))
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}
