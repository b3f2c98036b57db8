package guestimg

// What goes into the initramfs from the packages: the skeleton of
// directories and files, the kernel modules the guest needs, busybox and
// mke2fs.

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"

	"govmm/guestimg/internal/guestproto"
)

// baseTree lays out the package part of the initramfs from the unpacked
// packages in root and returns it with the kernel version.
func (b *builder) baseTree(ctx context.Context, root string) (*tree, string, error) {
	kvers, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	if len(kvers) != 1 {
		return nil, "", fmt.Errorf("kernel package: want one /boot/vmlinuz-*, found %d", len(kvers))
	}
	kver := strings.TrimPrefix(filepath.Base(kvers[0]), "vmlinuz-")
	t := newTree()

	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc/govmm", "proc", "sys", "dev", "run", "data", "root", "mnt", "lib64"} {
		t.dir(d, 0o755)
	}
	t.dir("tmp", 0o1777)
	// The kernel opens /dev/console for /init before anything is mounted.
	t.charDev("dev/console", 0o600, 5, 1)
	t.charDev("dev/null", 0o666, 1, 3)
	t.file("etc/hostname", 0o644, []byte("govmm\n"))
	t.file("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n"))
	t.file("etc/group", 0o644, []byte("root:x:0:\n"))
	t.file("etc/profile", 0o644, []byte("export PS1='\\h:\\w\\$ '\n"))
	t.symlink("etc/mtab", "/proc/self/mounts")

	if err := b.addModules(ctx, t, root, kver); err != nil {
		return nil, "", err
	}
	if err := addBusybox(ctx, t, root); err != nil {
		return nil, "", err
	}
	if err := addMke2fs(t, root); err != nil {
		return nil, "", err
	}
	return t, kver, nil
}

// addModules adds guestModules' closure from the kernel package's
// modules in root, their list (guestproto.ModulesPath, in load order,
// each with the devices it is needed for) and a modules.dep for them.
func (b *builder) addModules(ctx context.Context, t *tree, root, kver string) error {
	modDir := filepath.Join(root, "lib", "modules", kver)
	mods, ix, err := b.prepareModules(ctx, modDir)
	if err != nil {
		return err
	}
	needs, err := ix.moduleNeeds(guestModules, guestModuleNeeds)
	if err != nil {
		return fmt.Errorf("modules: %w", err)
	}
	var list bytes.Buffer
	for _, p := range mods {
		guestPath := path.Join("lib/modules", kver, p)
		t.fileFrom(guestPath, 0o644, filepath.Join(modDir, p))
		fmt.Fprintf(&list, "%s\n", strings.Join(append([]string{"/" + guestPath}, needs[p]...), " "))
	}
	t.file(strings.TrimPrefix(guestproto.ModulesPath, "/"), 0o644, list.Bytes())
	t.file(path.Join("lib/modules", kver, "modules.dep"), 0o644, subsetModulesDep(ix, mods))
	names := make([]string, len(mods))
	for i, p := range mods {
		names[i] = modName(p)
	}
	b.logf("kernel %s, modules: %s", kver, strings.Join(names, " "))
	return nil
}

// addBusybox adds busybox and a link for each of its applets but init.
// busybox-static is a static amd64 binary, so the host can ask it for its
// applet list.
func addBusybox(ctx context.Context, t *tree, root string) error {
	bbPath := filepath.Join(root, "bin", "busybox")
	t.fileFrom("bin/busybox", 0o755, bbPath)
	out, err := exec.CommandContext(ctx, bbPath, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w", err)
	}
	for _, a := range strings.Fields(string(out)) {
		switch path.Base(a) {
		case "busybox", "init", "linuxrc":
			continue // /init is ours
		}
		t.symlink(a, "/bin/busybox")
	}
	return nil
}

// addMke2fs adds mke2fs from e2fsprogs, with its loader and libraries; it
// replaces busybox's mkfs applets.
func addMke2fs(t *tree, root string) error {
	deps, err := elfClosure(root, []string{"/sbin/mke2fs"})
	if err != nil {
		return err
	}
	for _, d := range deps {
		t.fileFrom(strings.TrimPrefix(d.Real, "/"), 0o755, filepath.Join(root, d.Real))
		if d.Path != d.Real {
			t.symlink(strings.TrimPrefix(d.Path, "/"), d.Real)
		}
	}
	for _, n := range []string{"mkfs.ext4", "mkfs.ext3", "mkfs.ext2", "mke2fs"} {
		if n != "mke2fs" {
			t.symlink("sbin/"+n, "mke2fs")
		}
		delete(t.entries, "usr/sbin/"+n) // busybox applet of the same name
		delete(t.entries, "usr/bin/"+n)
	}
	if _, err := os.Stat(filepath.Join(root, "etc", "mke2fs.conf")); err == nil {
		t.fileFrom("etc/mke2fs.conf", 0o644, filepath.Join(root, "etc", "mke2fs.conf"))
	}
	return nil
}

// prepareModules makes sure modDir has uncompressed modules and a
// modules.dep, and returns the load order of guestModules' closure.
func (b *builder) prepareModules(ctx context.Context, modDir string) ([]string, *modIndex, error) {
	if err := b.decompressModules(ctx, modDir); err != nil {
		return nil, nil, err
	}
	if _, err := os.Stat(filepath.Join(modDir, "modules.dep")); err != nil {
		if err := depmod(modDir); err != nil {
			return nil, nil, err
		}
	}
	ix, err := loadModIndex(modDir)
	if err != nil {
		return nil, nil, err
	}
	mods, err := ix.closure(guestModules)
	if err != nil {
		return nil, nil, fmt.Errorf("modules: %w", err)
	}
	return mods, ix, nil
}

// decompressModules makes sure modDir holds uncompressed modules. Debian's
// 6.1 kernels ship plain .ko files (CONFIG_MODULE_COMPRESS_NONE and no
// in-kernel decompression). Should a later package ship .ko.xz, decompress
// with the host's xz so finit_module needs no flags.
func (b *builder) decompressModules(ctx context.Context, modDir string) error {
	var xzs []string
	err := filepath.WalkDir(modDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() && strings.HasSuffix(p, ".ko.xz") {
			xzs = append(xzs, p)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("modules: %w", err)
	}
	if len(xzs) == 0 {
		return nil
	}
	b.logf("decompressing %d modules", len(xzs))
	for i := 0; i < len(xzs); i += 500 {
		args := append([]string{"-d", "-f"}, xzs[i:min(i+500, len(xzs))]...)
		if o, err := exec.CommandContext(ctx, "xz", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("xz -d modules: %w: %s", err, lastLines(o, 3))
		}
	}
	// modules.dep, if shipped, names the .xz files; regenerate it.
	_ = os.Remove(filepath.Join(modDir, "modules.dep"))
	return nil
}
