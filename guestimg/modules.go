package guestimg

import (
	"bufio"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"govmm/guestimg/internal/guestproto"
)

// guestModules are the modules the guest needs; the builder adds their
// dependency closure. virtio_pci is the transport, virtio_net and virtio_blk
// the devices, ext4 the file system of the data disk.
var guestModules = []string{"virtio_pci", "virtio_net", "virtio_blk", "ext4"}

// guestModuleNeeds says for which devices each of guestModules is needed
// (guestproto.ModulesPath): the guest's /init loads a module, and its
// dependencies, only when its machine has such a device. A boot without
// a disk then skips ext4 and its helpers (about 2.5 MB of modules), one
// without any virtio device loads nothing.
var guestModuleNeeds = map[string][]string{
	"virtio_pci": {guestproto.NeedVirtioNet, guestproto.NeedVirtioBlk},
	"virtio_net": {guestproto.NeedVirtioNet},
	"virtio_blk": {guestproto.NeedVirtioBlk},
	"ext4":       {guestproto.NeedVirtioBlk},
}

// moduleNeeds returns, for each module path of roots' closure, the
// devices it is needed for: the union of needs[root] over the roots whose
// closure holds it, sorted. A root without needs makes its closure needed
// always (an empty list).
func (ix *modIndex) moduleNeeds(roots []string, needs map[string][]string) (map[string][]string, error) {
	set := map[string]map[string]bool{}
	always := map[string]bool{}
	for _, r := range roots {
		mods, err := ix.closure([]string{r})
		if err != nil {
			return nil, err
		}
		for _, m := range mods {
			if len(needs[r]) == 0 {
				always[m] = true
			}
			if set[m] == nil {
				set[m] = map[string]bool{}
			}
			for _, n := range needs[r] {
				set[m][n] = true
			}
		}
	}
	out := map[string][]string{}
	for m, ns := range set {
		if always[m] {
			out[m] = nil
			continue
		}
		for n := range ns {
			out[m] = append(out[m], n)
		}
		sort.Strings(out[m])
	}
	return out, nil
}

// ErrModuleNotFound is returned when a requested module is neither a module
// file, an alias of one, nor built into the kernel.
var ErrModuleNotFound = errors.New("kernel module not found")

// modIndex is what modprobe knows about the modules of one kernel: the
// contents of modules.dep, modules.softdep, modules.alias and
// modules.builtin. Paths are relative to /lib/modules/<version>.
type modIndex struct {
	path    map[string]string   // module name -> path
	deps    map[string][]string // module name -> names of its hard dependencies
	softPre map[string][]string // module name -> names or aliases to load before it
	alias   map[string][]string // alias -> module names
	builtin map[string]bool     // module names built into the kernel
}

// modName turns a module path or name into the kernel's spelling of the
// name: "kernel/arch/x86/crypto/crc32c-intel.ko.xz" -> "crc32c_intel".
func modName(p string) string {
	b := filepath.Base(p)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		b = strings.TrimSuffix(b, ext)
	}
	b = strings.TrimSuffix(b, ".ko")
	return strings.ReplaceAll(b, "-", "_")
}

// loadModIndex reads the depmod files in dir (/lib/modules/<version>).
// modules.dep is required; the others are optional.
func loadModIndex(dir string) (*modIndex, error) {
	ix := &modIndex{
		path: map[string]string{}, deps: map[string][]string{}, softPre: map[string][]string{},
		alias: map[string][]string{}, builtin: map[string]bool{},
	}
	if err := readLines(filepath.Join(dir, "modules.dep"), false, func(line string) error {
		mod, deps, ok := strings.Cut(line, ":")
		if !ok {
			return fmt.Errorf("no colon in %q", line)
		}
		name := modName(mod)
		ix.path[name] = mod
		for _, d := range strings.Fields(deps) {
			ix.deps[name] = append(ix.deps[name], modName(d))
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := readLines(filepath.Join(dir, "modules.softdep"), true, func(line string) error {
		// softdep MOD pre: a b post: c
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "softdep" {
			return nil
		}
		name, pre := modName(f[1]), false
		for _, w := range f[2:] {
			switch w {
			case "pre:":
				pre = true
			case "post:":
				pre = false
			default:
				if pre {
					ix.softPre[name] = append(ix.softPre[name], w)
				}
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := readLines(filepath.Join(dir, "modules.alias"), true, func(line string) error {
		f := strings.Fields(line)
		if len(f) == 3 && f[0] == "alias" {
			ix.alias[f[1]] = append(ix.alias[f[1]], modName(f[2]))
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := readLines(filepath.Join(dir, "modules.builtin"), true, func(line string) error {
		ix.builtin[modName(line)] = true
		return nil
	}); err != nil {
		return nil, err
	}
	return ix, nil
}

// readLines calls fn for each non-blank, non-comment line of the file.
func readLines(file string, optional bool, fn func(string) error) error {
	f, err := os.Open(file)
	if optional && errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read module index: %w", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; s.Scan(); n++ {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if err := fn(line); err != nil {
			return fmt.Errorf("%s:%d: %w", file, n, err)
		}
	}
	if err := s.Err(); err != nil {
		return fmt.Errorf("read %s: %w", file, err)
	}
	return nil
}

// resolve maps a name or alias to module names. Built-in modules resolve to
// nothing; an unknown name is an error.
func (ix *modIndex) resolve(name string) ([]string, error) {
	n := modName(name)
	if _, ok := ix.path[n]; ok {
		return []string{n}, nil
	}
	if mods, ok := ix.alias[name]; ok {
		return mods, nil
	}
	if ix.builtin[n] {
		return nil, nil
	}
	return nil, fmt.Errorf("%q: %w", name, ErrModuleNotFound)
}

// closure returns the paths of the modules named by roots and everything
// they need, in an order in which finit_module succeeds: every module after
// its hard dependencies and after its "pre:" soft dependencies (which is how
// ext4 gets a crc32c implementation without a modprobe helper at run time).
// Soft dependencies that do not exist are skipped, as modprobe does.
func (ix *modIndex) closure(roots []string) ([]string, error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var order []string
	var visit func(name string, stack []string) error
	visit = func(name string, stack []string) error {
		switch state[name] {
		case done:
			return nil
		case visiting:
			// Only soft dependencies can loop; the hard graph is a DAG.
			return nil
		}
		state[name] = visiting
		stack = append(stack, name)
		for _, s := range ix.softPre[name] {
			mods, err := ix.resolve(s)
			if err != nil {
				continue
			}
			for _, m := range mods {
				if err := visit(m, stack); err != nil {
					return err
				}
			}
		}
		for _, d := range ix.deps[name] {
			if _, ok := ix.path[d]; !ok {
				return fmt.Errorf("%s needs %q: %w", strings.Join(stack, " -> "), d, ErrModuleNotFound)
			}
			if err := visit(d, stack); err != nil {
				return err
			}
		}
		state[name] = done
		order = append(order, ix.path[name])
		return nil
	}
	for _, r := range roots {
		mods, err := ix.resolve(r)
		if err != nil {
			return nil, err
		}
		for _, m := range mods {
			if err := visit(m, nil); err != nil {
				return nil, err
			}
		}
	}
	return order, nil
}

// modInfo is the part of a module's .modinfo section that depmod reads.
type modInfo struct {
	Name    string
	Depends []string
	SoftPre []string
	Aliases []string
}

// parseModinfo decodes the NUL-separated key=value strings of a .modinfo
// section.
func parseModinfo(sec []byte) modInfo {
	var mi modInfo
	for _, kv := range bytes.Split(sec, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			mi.Name = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d != "" {
					mi.Depends = append(mi.Depends, modName(d))
				}
			}
		case "alias":
			mi.Aliases = append(mi.Aliases, v)
		case "softdep":
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						mi.SoftPre = append(mi.SoftPre, w)
					}
				}
			}
		}
	}
	return mi
}

// readModinfo reads the .modinfo section of an uncompressed module file.
func readModinfo(r io.ReaderAt) (modInfo, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return modInfo{}, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return modInfo{}, errors.New("no .modinfo section")
	}
	b, err := sec.Data()
	if err != nil {
		return modInfo{}, fmt.Errorf("read .modinfo: %w", err)
	}
	return parseModinfo(b), nil
}

// depmod writes modules.dep, modules.softdep and modules.alias into dir
// (/lib/modules/<version> of an unpacked kernel package) from the modules'
// own .modinfo sections. Debian generates these files in the package's
// postinst, so the .deb does not ship them, and the host may lack depmod.
// Only uncompressed modules are indexed; compressed ones are decompressed by
// the caller first.
func depmod(dir string) error {
	infos := map[string]modInfo{} // by name
	paths := map[string]string{}  // name -> relative path
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		mi, err := readModinfo(f)
		if err != nil {
			return fmt.Errorf("module %s: %w", p, err)
		}
		rel, _ := filepath.Rel(dir, p)
		name := modName(rel)
		if mi.Name != "" {
			name = modName(mi.Name)
		}
		infos[name], paths[name] = mi, filepath.ToSlash(rel)
		return nil
	})
	if err != nil {
		return fmt.Errorf("depmod %s: %w", dir, err)
	}
	names := make([]string, 0, len(infos))
	for n := range infos {
		names = append(names, n)
	}
	sort.Strings(names)

	var dep, soft, alias bytes.Buffer
	for _, n := range names {
		// modules.dep lists the full transitive closure, deepest last, as
		// depmod does; loadModIndex accepts direct-only lists too.
		var all []string
		seen := map[string]bool{n: true}
		var walk func(string)
		walk = func(m string) {
			for _, d := range infos[m].Depends {
				if !seen[d] {
					seen[d] = true
					all = append(all, d)
					walk(d)
				}
			}
		}
		walk(n)
		fmt.Fprintf(&dep, "%s:", paths[n])
		for _, d := range all {
			if p, ok := paths[d]; ok {
				fmt.Fprintf(&dep, " %s", p)
			}
		}
		dep.WriteByte('\n')
		if len(infos[n].SoftPre) > 0 {
			fmt.Fprintf(&soft, "softdep %s pre: %s\n", n, strings.Join(infos[n].SoftPre, " "))
		}
		for _, a := range infos[n].Aliases {
			fmt.Fprintf(&alias, "alias %s %s\n", a, n)
		}
	}
	for file, b := range map[string][]byte{"modules.dep": dep.Bytes(), "modules.softdep": soft.Bytes(), "modules.alias": alias.Bytes()} {
		if err := os.WriteFile(filepath.Join(dir, file), b, 0o644); err != nil {
			return fmt.Errorf("depmod: %w", err)
		}
	}
	return nil
}

// subsetModulesDep renders modules.dep for just the given modules (paths
// in load order, a closure), so busybox modprobe in the guest agrees with
// what the image holds.
func subsetModulesDep(ix *modIndex, paths []string) []byte {
	var b bytes.Buffer
	for _, p := range paths {
		fmt.Fprintf(&b, "%s:", p)
		for _, d := range ix.deps[modName(p)] {
			fmt.Fprintf(&b, " %s", ix.path[d])
		}
		b.WriteByte('\n')
	}
	return b.Bytes()
}
