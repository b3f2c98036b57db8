package guestimg

import (
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// ErrLibraryNotFound is returned when a DT_NEEDED library is in none of the
// search directories.
var ErrLibraryNotFound = errors.New("shared library not found")

// libDirs is where Debian's dynamic loader looks when there is no
// ld.so.cache: the multiarch directories first.
var libDirs = []string{
	"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
	"/lib64", "/usr/lib64", "/lib", "/usr/lib",
}

// elfDep is one file that a dynamically linked program needs at run time.
// Both paths are absolute inside the root. Path is the name the program or
// the loader asks for; Real is that name with symlinks resolved, where the
// bytes live. When they differ the image holds a symlink Path -> Real.
type elfDep struct {
	Path, Real string
}

// elfClosure returns the programs bins (absolute paths inside root), their
// dynamic loader (PT_INTERP) and every shared library reachable through
// DT_NEEDED, each once, programs first. Static programs need nothing more.
func elfClosure(root string, bins []string) ([]elfDep, error) {
	var out []elfDep
	seen := map[string]bool{}
	add := func(p string) (elfDep, bool, error) {
		if seen[p] {
			return elfDep{}, false, nil
		}
		seen[p] = true
		real, err := resolveIn(root, p)
		if err != nil {
			return elfDep{}, false, err
		}
		d := elfDep{Path: p, Real: real}
		out = append(out, d)
		return d, true, nil
	}
	queue := []string{}
	for _, b := range bins {
		if _, _, err := add(b); err != nil {
			return nil, fmt.Errorf("elf closure: %w", err)
		}
		queue = append(queue, b)
	}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		real, err := resolveIn(root, p)
		if err != nil {
			return nil, fmt.Errorf("elf closure: %w", err)
		}
		interp, needed, err := elfNeeds(filepath.Join(root, real))
		if err != nil {
			return nil, fmt.Errorf("elf closure: %s: %w", p, err)
		}
		if interp != "" {
			if _, isNew, err := add(interp); err != nil {
				return nil, fmt.Errorf("elf closure: %s: loader: %w", p, err)
			} else if isNew {
				queue = append(queue, interp)
			}
		}
		for _, lib := range needed {
			lp, err := findLib(root, lib)
			if err != nil {
				return nil, fmt.Errorf("elf closure: %s: %w", p, err)
			}
			if _, isNew, err := add(lp); err != nil {
				return nil, fmt.Errorf("elf closure: %s: %w", p, err)
			} else if isNew {
				queue = append(queue, lp)
			}
		}
	}
	return out, nil
}

// elfNeeds reads the loader path and DT_NEEDED entries of one ELF file.
func elfNeeds(file string) (interp string, needed []string, err error) {
	f, err := elf.Open(file)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, p.Filesz)
		if _, err := p.ReadAt(b, 0); err != nil {
			return "", nil, fmt.Errorf("read PT_INTERP: %w", err)
		}
		interp = strings.TrimRight(string(b), "\x00")
	}
	needed, err = f.ImportedLibraries()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return "", nil, fmt.Errorf("read DT_NEEDED: %w", err)
	}
	return interp, needed, nil
}

// findLib returns the absolute path inside root of the first search
// directory that holds soname.
func findLib(root, soname string) (string, error) {
	if strings.Contains(soname, "/") {
		return soname, nil
	}
	for _, d := range libDirs {
		p := path.Join(d, soname)
		real, err := resolveIn(root, p)
		if err != nil {
			continue
		}
		if fi, err := os.Stat(filepath.Join(root, real)); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w (searched %s)", soname, ErrLibraryNotFound, strings.Join(libDirs, ", "))
}

// resolveIn resolves symlinks in p (absolute, inside root) as if root were
// "/": absolute link targets are taken relative to root and ".." never
// leaves it. The result is absolute and clean, and the file exists.
func resolveIn(root, p string) (string, error) {
	const maxLinks = 40
	links := 0
	rest := strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/")
	cur := "/"
	for len(rest) > 0 {
		c := rest[0]
		rest = rest[1:]
		if c == "" || c == "." {
			continue
		}
		if c == ".." {
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, c)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", fmt.Errorf("resolve %s: %w", p, err)
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		if links++; links > maxLinks {
			return "", fmt.Errorf("resolve %s: too many symlinks", p)
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", fmt.Errorf("resolve %s: %w", p, err)
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return cur, nil
}
