package guestimg

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// ErrNoPVHKernel is returned by PVHKernel for a bzImage that cannot be
// entered through PVH: its kernel cannot be extracted (ErrNoPayload), or
// the extracted kernel was not accepted (no PVH note).
var ErrNoPVHKernel = errors.New("no PVH kernel")

// pvhCacheVersion names the cache's entries: bump it when what
// ExtractVmlinux or TrimVmlinux write changes, so that older entries are
// not used.
const pvhCacheVersion = 1

// PVHKernel returns the path of the uncompressed, packed kernel
// (ExtractVmlinux, then TrimVmlinux) of the bzImage in file bz (mapped or
// read: its bytes), which a VMM enters through its PVH note instead of
// running the bzImage's decompressor in the guest. It is made once and kept
// under dir/pvh (DefaultCacheDir's), named by a hash of the bzImage's
// contents; accept vets a kernel before it is kept (the VMM's check that it
// has a PVH entry). A bzImage whose kernel cannot be extracted or is not
// accepted is remembered too (KEY.no holds the reason), so that later
// boots do not decompress it again to learn the same; they get
// ErrNoPVHKernel after hashing it.
//
// Hashing a kernel's 8-15 MB takes a few milliseconds here but a few
// hundred in the lab, where every instruction is emulated: a small index
// by the file's identity (device, inode, size, modification and change
// times: stat-KEY, holding the contents' hash) skips it on later boots of
// a kernel that has an entry (not for refused ones: tests boot many
// throwaway copies of tiny kernels, each its own identity).
// Entries are written to a temporary file, synced and renamed, so
// concurrent VMMs see a whole entry or none, even after a crash. The cache
// keeps the pvhCacheKeep most recently used kernels.
func PVHKernel(ctx context.Context, dir, bzPath string, bz []byte, accept func([]byte) error) (string, error) {
	dir = filepath.Join(dir, "pvh")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("pvh kernel cache: %w", err)
	}
	statKey := fileIdentity(bzPath)
	var key string
	indexed := false
	if statKey != "" {
		if b, err := os.ReadFile(filepath.Join(dir, "stat-"+statKey)); err == nil {
			key = strings.TrimSpace(string(b))
			indexed = key != ""
		}
	}
	if key == "" {
		sum := sha256.Sum256(bz)
		key = fmt.Sprintf("v%d-%s", pvhCacheVersion, hex.EncodeToString(sum[:16]))
	}
	path := filepath.Join(dir, key+".vmlinux")
	noPath := filepath.Join(dir, key+".no")
	remember := func() {
		if statKey != "" && !indexed {
			_ = writeCacheFile(filepath.Join(dir, "stat-"+statKey), []byte(key+"\n"))
		}
	}
	if _, err := os.Stat(path); err == nil {
		remember()
		now := time.Now()
		_ = os.Chtimes(path, now, now) // recently used: kept by pruneCache
		return path, nil
	}
	if why, err := os.ReadFile(noPath); err == nil {
		return "", fmt.Errorf("%w: %s (remembered in %s)", ErrNoPVHKernel, strings.TrimSpace(string(why)), noPath)
	}
	k, err := ExtractVmlinux(ctx, bz)
	if err == nil {
		k, err = TrimVmlinux(k)
	}
	if err == nil && accept != nil {
		err = accept(k)
	}
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, exec.ErrNotFound) {
			// Interrupted, or the host lacks xz: nothing learnt about
			// the kernel itself.
			return "", fmt.Errorf("%w: %w", ErrNoPVHKernel, err)
		}
		_ = writeCacheFile(noPath, []byte(err.Error()+"\n"))
		return "", fmt.Errorf("%w: %w", ErrNoPVHKernel, err)
	}
	if err := writeCacheFile(path, k); err != nil {
		return "", fmt.Errorf("pvh kernel cache: %w", err)
	}
	remember()
	pruneCache(dir, pvhCacheKeep, path)
	return path, nil
}

// pvhCacheKeep is how many kernels the cache keeps (about 30 MB each for
// a distribution's kernel): a user who builds kernel after kernel does
// not fill the disk with them.
const pvhCacheKeep = 4

// pruneCache removes the least recently used kernels (by modification
// time, which a hit refreshes) beyond keep, never keepPath. Errors are
// ignored: a kernel not removed is only disk space, and one removed under
// a VMM that is mapping it stays readable to that VMM.
func pruneCache(dir string, keep int, keepPath string) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.vmlinux"))
	if err != nil || len(paths) <= keep {
		return
	}
	type entry struct {
		path string
		mod  time.Time
	}
	var es []entry
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			es = append(es, entry{p, fi.ModTime()})
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].mod.After(es[j].mod) })
	others := 0 // kept besides keepPath
	for _, e := range es {
		if e.path == keepPath {
			continue
		}
		if others < keep-1 {
			others++
			continue
		}
		_ = os.Remove(e.path)
	}
}

// fileIdentity is a key for the file at path as it is now: it changes
// when the file is replaced or written. Empty when path cannot be
// stat'ed.
func fileIdentity(path string) string {
	if path == "" {
		return ""
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return ""
	}
	var st syscall.Stat_t
	if err := syscall.Stat(abs, &st); err != nil {
		return ""
	}
	id := fmt.Sprintf("v%d %s %d %d %d %d.%d %d.%d", pvhCacheVersion, abs, st.Dev, st.Ino, st.Size,
		st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec)
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:16])
}

// writeCacheFile writes data to name through a temporary file of its own
// and a rename: a concurrent writer of the same entry cannot interleave.
func writeCacheFile(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), filepath.Base(name)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err == nil {
		err = f.Sync() // renamed whole after a crash, never empty
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", filepath.Base(name), err)
	}
	return nil
}
