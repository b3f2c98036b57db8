package guestimg

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// labInit is the /init of the lab's L1 machine (see BuildLab and package
// lab): a busybox shell script, so that a reader sees every step.
//
//go:embed labinit.sh
var labInit []byte

// labModules are what L1 needs on top of the kernel's built-ins: virtio-pci
// and 9p to mount the host's file system, overlayfs to make it writable,
// virtio_console for the command's output channel, kvm_amd (with kvm, ccp
// and irqbypass) for a /dev/kvm on QEMU's emulated SVM, tun, bridge and
// veth for the network tests' TAP devices, bridges and namespaces, and
// loop for the tests of a standby's disk on a block device.
var labModules = []string{
	"virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_console",
	"kvm_amd", "tun", "bridge", "veth", "loop",
}

// LabModulesPath lists L1's modules in load order, one path per line.
const labModulesPath = "etc/lab/modules"

// BuildLab returns the lab's L1 image, building it if needed: Debian's
// kernel (the same package as the default guest's) and an initramfs with
// busybox, the modules of labModules' closure and labinit.sh as /init. It
// lives in <cache>/lab/<key>/{vmlinuz,initrd.img}, keyed by the kernel and
// busybox packages, the init script and the builder version; like Build it
// never touches apt or the network once cached, and concurrent builders
// are serialized by the cache lock. SourceDir is not needed.
func BuildLab(ctx context.Context, opts Options) (Image, error) {
	b := &builder{cache: opts.CacheDir, log: opts.Log}
	if b.cache == "" {
		b.cache = DefaultCacheDir()
	}
	var err error
	if b.cache, err = filepath.Abs(b.cache); err != nil {
		return Image{}, fmt.Errorf("cache dir: %w", err)
	}
	if b.log == nil {
		b.log = io.Discard
	}
	if m, err := readManifest(b.debsDir()); err == nil {
		if img, ok := b.labCached(m); ok {
			return img, nil
		}
	}
	unlock, err := b.lock(ctx)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	b.removeStale()
	m, err := readManifest(b.debsDir())
	if err != nil {
		if m, err = b.downloadDebs(ctx, b.debsDir()); err != nil {
			return Image{}, fmt.Errorf("build lab image: %w", err)
		}
	}
	if img, ok := b.labCached(m); ok {
		return img, nil
	}
	img, err := b.buildLab(ctx, m)
	if err != nil {
		return Image{}, fmt.Errorf("build lab image: %w", err)
	}
	return img, nil
}

// labKey names an L1 image: the kernel and busybox packages, the init
// script and the module list.
func (b *builder) labKey(m *debManifest) string {
	h := sha256.New()
	fmt.Fprintf(h, "govmm lab v%d\nkernel %s\nbusybox %s\nmodules %s\n", builderVersion,
		m.Kernel, m.Busybox, strings.Join(labModules, " "))
	h.Write(labInit)
	return hex.EncodeToString(h.Sum(nil)[:16])
}

func (b *builder) labPaths(m *debManifest) Image {
	dir := filepath.Join(b.cache, "lab", b.labKey(m))
	return Image{Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
}

func (b *builder) labCached(m *debManifest) (Image, bool) {
	img := b.labPaths(m)
	for _, p := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return Image{}, false
		}
	}
	return img, true
}

// buildLab unpacks the kernel and busybox packages and writes the L1
// image. The caller holds the lock. (Long, on purpose: it is the list of
// what goes into L1, module by module and file by file, in the order of
// the initramfs; split, the list would no longer read as one.)
func (b *builder) buildLab(ctx context.Context, m *debManifest) (Image, error) {
	start := time.Now()
	labDir := filepath.Join(b.cache, "lab")
	if err := os.MkdirAll(labDir, 0o755); err != nil {
		return Image{}, fmt.Errorf("create lab dir: %w", err)
	}
	tmp, err := os.MkdirTemp(labDir, "tmp-")
	if err != nil {
		return Image{}, fmt.Errorf("create lab dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	root, out := filepath.Join(tmp, "root"), filepath.Join(tmp, "out")
	for _, d := range []string{root, out} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return Image{}, fmt.Errorf("create lab dir: %w", err)
		}
	}
	for _, f := range []string{m.Kernel, m.Busybox} {
		cmd := exec.CommandContext(ctx, "dpkg-deb", "-x", filepath.Join(b.debsDir(), f), root)
		if o, err := cmd.CombinedOutput(); err != nil {
			return Image{}, fmt.Errorf("dpkg-deb -x %s: %w: %s", f, err, lastLines(o, 3))
		}
	}
	kvers, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kvers) != 1 {
		return Image{}, fmt.Errorf("kernel package: want one /boot/vmlinuz-*, found %d", len(kvers))
	}
	kver := strings.TrimPrefix(filepath.Base(kvers[0]), "vmlinuz-")
	modDir := filepath.Join(root, "lib", "modules", kver)
	if err := b.decompressModules(ctx, modDir); err != nil {
		return Image{}, err
	}
	if _, err := os.Stat(filepath.Join(modDir, "modules.dep")); err != nil {
		if err := depmod(modDir); err != nil {
			return Image{}, err
		}
	}
	ix, err := loadModIndex(modDir)
	if err != nil {
		return Image{}, err
	}
	mods, err := ix.closure(labModules)
	if err != nil {
		return Image{}, fmt.Errorf("lab modules: %w", err)
	}

	t := newTree()
	for _, d := range []string{"bin", "proc", "sys", "dev", "host", "rw", "newroot", "lab", "tmp"} {
		t.dir(d, 0o755)
	}
	t.charDev("dev/console", 0o600, 5, 1)
	t.charDev("dev/null", 0o666, 1, 3)
	t.fileFrom("bin/busybox", 0o755, filepath.Join(root, "bin", "busybox"))
	t.symlink("bin/sh", "busybox")
	t.file("init", 0o755, labInit)
	var list strings.Builder
	for _, p := range mods {
		dst := path.Join("lib/modules", kver, p)
		t.fileFrom(dst, 0o644, filepath.Join(modDir, p))
		fmt.Fprintf(&list, "/%s\n", dst)
	}
	t.file(labModulesPath, 0o644, []byte(list.String()))

	if err := linkOrCopy(kvers[0], filepath.Join(out, "vmlinuz")); err != nil {
		return Image{}, err
	}
	if err := writeArchive(filepath.Join(out, "initrd.img"), t); err != nil {
		return Image{}, fmt.Errorf("write lab initrd: %w", err)
	}
	if err := syncDir(out); err != nil {
		return Image{}, err
	}
	img := b.labPaths(m)
	if err := os.Rename(out, filepath.Dir(img.Kernel)); err != nil && !errors.Is(err, os.ErrExist) {
		if _, serr := os.Stat(img.Initrd); serr != nil {
			return Image{}, fmt.Errorf("store lab image: %w", err)
		}
	}
	_ = syncDir(labDir)
	b.logf("lab image (kernel %s, %d modules) ready in %v: %s", kver, len(mods),
		time.Since(start).Round(time.Millisecond), filepath.Dir(img.Kernel))
	return img, nil
}
