package guestimg

import (
	"io/fs"
	"os"
	"path"
	"sort"
)

// tree is a file system image to be written as cpio. Parent directories
// are implied; entries are written sorted, so parents come first.
type tree struct {
	entries map[string]treeEntry
}

type treeEntry struct {
	kind         byte // 'd', 'f', 'l', 'c'
	perm         fs.FileMode
	data         []byte // file contents or link target
	src          string // file contents from this host file, if set
	major, minor uint32
}

func newTree() *tree { return &tree{entries: map[string]treeEntry{}} }

func (t *tree) add(name string, e treeEntry) {
	for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
		if _, ok := t.entries[d]; !ok {
			t.entries[d] = treeEntry{kind: 'd', perm: 0o755}
		}
	}
	t.entries[name] = e
}

func (t *tree) dir(name string, perm fs.FileMode) { t.add(name, treeEntry{kind: 'd', perm: perm}) }
func (t *tree) file(name string, perm fs.FileMode, data []byte) {
	t.add(name, treeEntry{kind: 'f', perm: perm, data: data})
}
func (t *tree) fileFrom(name string, perm fs.FileMode, src string) {
	t.add(name, treeEntry{kind: 'f', perm: perm, src: src})
}
func (t *tree) symlink(name, target string) { t.add(name, treeEntry{kind: 'l', data: []byte(target)}) }
func (t *tree) charDev(name string, perm fs.FileMode, major, minor uint32) {
	t.add(name, treeEntry{kind: 'c', perm: perm, major: major, minor: minor})
}

func (t *tree) write(w *cpioWriter) error { return t.writeEntries(w, false) }

// writeNoParents writes only files, for an archive appended to one that
// already has the directories.
func (t *tree) writeNoParents(w *cpioWriter) error { return t.writeEntries(w, true) }

func (t *tree) writeEntries(w *cpioWriter, skipDirs bool) error {
	names := make([]string, 0, len(t.entries))
	for n := range t.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		e := t.entries[n]
		var err error
		switch e.kind {
		case 'd':
			if skipDirs {
				continue
			}
			err = w.Dir(n, e.perm)
		case 'f':
			data := e.data
			if e.src != "" {
				if data, err = os.ReadFile(e.src); err != nil {
					return err
				}
			}
			err = w.File(n, e.perm, data)
		case 'l':
			err = w.Symlink(n, string(e.data))
		case 'c':
			err = w.CharDev(n, e.perm, e.major, e.minor)
		}
		if err != nil {
			return err
		}
	}
	return w.Close()
}
