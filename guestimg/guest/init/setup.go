package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"govmm/guestimg/internal/guestproto"
)

// mountAll mounts the pseudo file systems every program here expects.
func (in *initProc) mountAll() {
	type mnt struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}
	const nse = syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_NOEXEC
	for _, m := range []mnt{
		{"proc", "/proc", "proc", nse, ""},
		{"sysfs", "/sys", "sysfs", nse, ""},
		{"devtmpfs", "/dev", "devtmpfs", syscall.MS_NOSUID, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", syscall.MS_NOSUID | syscall.MS_NOEXEC, "gid=5,mode=620,ptmxmode=666"},
		{"tmpfs", "/dev/shm", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=1777"},
		{"tmpfs", "/tmp", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", syscall.MS_NOSUID | syscall.MS_NODEV, "mode=0755"},
	} {
		_ = os.MkdirAll(m.dst, 0o755)
		if err := syscall.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil && !errors.Is(err, syscall.EBUSY) {
			in.errorf("mount %s on %s: %v", m.fstype, m.dst, err)
		}
	}
	for name, target := range map[string]string{
		"/dev/fd": "/proc/self/fd", "/dev/stdin": "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1", "/dev/stderr": "/proc/self/fd/2",
	} {
		_ = os.Symlink(target, name)
	}
}

// loadModules loads the modules listed by the image builder, in order,
// those for devices this machine lacks left out (see wantModule).
func (in *initProc) loadModules() {
	list, err := os.ReadFile(guestproto.ModulesPath)
	if err != nil {
		in.errorf("modules: %v", err)
		return
	}
	has := map[string]bool{
		guestproto.NeedVirtioNet: pciHas(virtioNetIDs),
		guestproto.NeedVirtioBlk: pciHas(virtioBlkIDs),
	}
	for _, line := range strings.Split(string(list), "\n") {
		p, ok := wantModule(line, has)
		if !ok {
			continue
		}
		if err := loadModule(p); err != nil {
			in.errorf("load module %s: %v", filepath.Base(p), err)
		}
	}
}

// wantModule reads one line of guestproto.ModulesPath: the module's path,
// then the devices it is needed for. It is wanted when the line names no
// device or one that has says the machine has.
func wantModule(line string, has map[string]bool) (path string, ok bool) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return "", false
	}
	if len(f) == 1 {
		return f[0], true
	}
	for _, need := range f[1:] {
		if has[need] {
			return f[0], true
		}
	}
	return f[0], false
}

func loadModule(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(p, ".xz") || strings.HasSuffix(p, ".zst") {
		flags = moduleInitCompressedFile
	}
	var noParams [1]byte // finit_module(2) takes a C string of parameters
	_, _, e := syscall.Syscall(sysFinitModule, f.Fd(), uintptr(unsafe.Pointer(&noParams[0])), uintptr(flags))
	if e != 0 && e != syscall.EEXIST {
		return e
	}
	return nil
}
