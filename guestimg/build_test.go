package guestimg

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/guestimg/internal/guestproto"
	"govmm/internal/boottrace"
)

func TestDefaultCacheDir(t *testing.T) {
	t.Setenv("GOVMM_CACHE", "/x/govmm-cache")
	assert.Equal(t, "/x/govmm-cache", DefaultCacheDir())
	t.Setenv("GOVMM_CACHE", "")
	t.Setenv("XDG_CACHE_HOME", "/y")
	assert.Equal(t, "/y/govmm", DefaultCacheDir())
}

func TestParseDepends(t *testing.T) {
	t.Parallel()
	got := parseDepends("linux-image-6.1.0-48-amd64 (= 6.1.172-1), libc6 (>= 2.34), a | b, libfoo:any")
	assert.Equal(t, []debDep{
		{name: "linux-image-6.1.0-48-amd64", exact: "6.1.172-1"},
		{name: "libc6"},
		{name: "a"},
		{name: "libfoo"},
	}, got)
	assert.Empty(t, parseDepends(""))
}

// The guest programs' sources are in the binary, and they are the
// checkout's (the test runs in guestimg/).
func TestEmbeddedGuestSources(t *testing.T) {
	files, err := guestSourceFiles()
	require.NoError(t, err)
	for _, f := range []string{"guest/init/main.go", "guest/init/session.go", "guest/demo/service.go",
		"guest/dirtier/main.go", "internal/guestproto/guestproto.go"} {
		assert.Contains(t, files, f)
	}
	for _, f := range files {
		assert.False(t, strings.HasSuffix(f, "_test.go"), f)
		embedded, err := guestSources.ReadFile(f)
		require.NoError(t, err)
		onDisk, err := os.ReadFile(filepath.FromSlash(f))
		require.NoError(t, err)
		assert.Equal(t, string(onDisk), string(embedded), f)
	}
}

// The embedded guest programs build on their own: in a temporary module
// outside the checkout, with nothing to download (GOPROXY=off), into
// static executables: one multi-call /init, and the other programs as
// symbolic links to it.
func TestBuildGuestProgramsFromEmbeddedSources(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skipf("needs the go command: %v", err)
	}
	b, err := newBuilder(Options{CacheDir: t.TempDir()})
	require.NoError(t, err)
	t.Chdir(t.TempDir()) // nowhere near a go.mod
	archive, err := b.buildGuestPrograms(t.Context())
	require.NoError(t, err)
	ents, err := readCPIO(archive)
	require.NoError(t, err)
	got := map[string]cpioEntry{}
	for _, e := range ents {
		got[e.Name] = e
	}
	require.Contains(t, got, "init")
	assert.Equal(t, []byte("\x7fELF"), got["init"].Data[:4])
	for _, name := range []string{"bin/govmm-demo", "bin/govmm-dirtier"} {
		require.Contains(t, got, name)
		assert.Equal(t, uint32(cpioModeSymlink), got[name].Mode&cpioModeType, name)
		assert.Equal(t, "/init", string(got[name].Data), name)
	}
	assert.Len(t, got, 3, "one binary and its two links")
}

// The image key follows the guest sources.
func TestImageKeyCoversGuestSources(t *testing.T) {
	var a, b strings.Builder
	require.NoError(t, hashGuestSources(&a))
	require.NoError(t, hashGuestSources(&b))
	assert.Equal(t, a.String(), b.String())
	assert.Contains(t, a.String(), "file guest/init/main.go ")
}

// TestBuildDefaultImage builds the real image: it downloads Debian packages
// on first use (into the default cache, so later runs and other packages'
// tests reuse them).
func TestBuildDefaultImage(t *testing.T) {
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skipf("needs apt-get to download Debian packages: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	var log bytes.Buffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("build log:\n%s", log.String())
		}
	})
	opts := Options{Log: &log}
	img, err := Build(ctx, opts)
	require.NoError(t, err)
	assert.True(t, filepath.IsAbs(img.Kernel))
	assert.True(t, filepath.IsAbs(img.Initrd))

	// bzImage: the setup header's "HdrS" magic at 0x202.
	kernel, err := os.ReadFile(img.Kernel)
	require.NoError(t, err)
	require.Greater(t, len(kernel), 0x206)
	assert.Equal(t, "HdrS", string(kernel[0x202:0x206]))
	// vmlinux: the same kernel uncompressed, an ELF file.
	vmlinux, err := os.ReadFile(img.Vmlinux)
	require.NoError(t, err)
	assert.Equal(t, "\x7fELF", string(vmlinux[:4]))

	initrd, err := os.ReadFile(img.Initrd)
	require.NoError(t, err)
	ents, err := readCPIO(initrd)
	require.NoError(t, err)
	files := map[string]cpioEntry{}
	for _, e := range ents {
		files[e.Name] = e
	}
	for _, name := range []string{
		"init", "bin/busybox", "bin/sh", "sbin/ip", "bin/govmm-demo", "bin/govmm-dirtier",
		"sbin/mke2fs", "sbin/mkfs.ext4", "etc/mke2fs.conf", "etc/govmm/modules", "dev/console",
		"lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libext2fs.so.2",
	} {
		assert.Contains(t, files, name)
	}
	assert.Equal(t, uint32(cpioModeChar), files["dev/console"].Mode&cpioModeType)
	assert.Equal(t, [2]uint32{5, 1}, [2]uint32{files["dev/console"].RMajor, files["dev/console"].RMinor})
	assert.Equal(t, "mke2fs", string(files["sbin/mkfs.ext4"].Data))
	assert.Equal(t, []byte("\x7fELF"), files["init"].Data[:4])

	// Every listed module is in the image, and the ones we asked for are
	// listed after their dependencies.
	// Each line: the module's path, then the devices it is for.
	var mods []string
	for _, line := range strings.Split(strings.TrimSpace(string(files["etc/govmm/modules"].Data)), "\n") {
		f := strings.Fields(line)
		require.NotEmpty(t, f)
		assert.NotEmpty(t, f[1:], "%s is needed for some device", f[0])
		mods = append(mods, f[0])
	}
	pos := map[string]int{}
	for i, m := range mods {
		require.Contains(t, files, strings.TrimPrefix(m, "/"))
		pos[modName(m)] = i
	}
	for _, m := range []string{"virtio_pci", "virtio_net", "virtio_blk", "ext4", "jbd2", "mbcache", "virtio", "virtio_ring", "failover"} {
		assert.Contains(t, pos, m)
	}
	assert.Less(t, pos["virtio"], pos["virtio_pci"])
	assert.Less(t, pos["jbd2"], pos["ext4"])
	assert.Less(t, pos["crc32c_generic"], pos["ext4"], "ext4's softdep on crc32c")

	// The initrd accepts a command archive after it.
	cmd, err := CommandArchive([]string{"nproc"})
	require.NoError(t, err)
	withCmd, err := readCPIO(append(append([]byte{}, initrd...), cmd...))
	require.NoError(t, err)
	assert.Equal(t, "govmm/cmd", withCmd[len(withCmd)-1].Name)
	t.Logf("kernel %d KiB, initrd %d KiB, %d files", len(kernel)>>10, len(initrd)>>10, len(ents))

	// Nothing changed: a cache hit (same paths, the files not rewritten).
	mtime := func(p string) time.Time {
		fi, err := os.Stat(p)
		require.NoError(t, err)
		return fi.ModTime()
	}
	kt, it := mtime(img.Kernel), mtime(img.Initrd)
	start := time.Now()
	again, err := Build(ctx, Options{})
	require.NoError(t, err)
	assert.Equal(t, img, again)
	assert.Equal(t, kt, mtime(img.Kernel), "a cache hit rewrites nothing")
	assert.Equal(t, it, mtime(img.Initrd), "a cache hit rewrites nothing")
	t.Logf("cached Build took %v", time.Since(start))
}

// The VMM's boot trace reads the lines /init prints: the same strings.
func TestBootTraceContract(t *testing.T) {
	assert.Equal(t, guestproto.ReadyLine, boottrace.ReadyLine)
	assert.Equal(t, guestproto.BootTraceLine, boottrace.BootTraceLine)
}
