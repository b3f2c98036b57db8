package guestimg

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// What apt-get download --print-uris says (apt 2.6, Debian 12): the sizes
// sum to the download's total; other lines are not packages.
func TestParsePrintURIs(t *testing.T) {
	t.Parallel()
	out := []byte("'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744\n" +
		"'http://deb.debian.org/debian/pool/main/e/e2fsprogs/e2fsprogs_1.47.0-2%2bb2_amd64.deb' e2fsprogs_1.47.0-2+b2_amd64.deb 571920 SHA256:fedd424691c08ef0739729026be298e7be8236337bf8e031b3c7ec66794e6fc2\n" +
		"W: a warning\n\n")
	assert.Equal(t, int64(928188+571920), parsePrintURIs(out))
	assert.Zero(t, parsePrintURIs(nil))
}

// The download's progress is the growth of the files in the download
// directory, added to what earlier downloads brought, against the sizes
// announced so far; a failed download is not counted.
func TestWatchDownload(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "earlier.deb"), make([]byte, 100), 0o644))
	var mu sync.Mutex
	var done, total int64
	b := &builder{progress: func(d, tt int64) { mu.Lock(); done, total = d, tt; mu.Unlock() }}
	seen := func(d, tt int64) func() bool {
		return func() bool { mu.Lock(); defer mu.Unlock(); return done == d && total == tt }
	}

	stop := b.watchDownload(dir, 3000)
	f, err := os.Create(filepath.Join(dir, "kernel.deb"))
	require.NoError(t, err)
	_, err = f.Write(make([]byte, 1000))
	require.NoError(t, err)
	require.Eventually(t, seen(1000, 3000), 10*time.Second, time.Millisecond, "a file being written counts")
	_, err = f.Write(make([]byte, 2000))
	require.NoError(t, err)
	require.NoError(t, f.Close())
	stop(true)
	require.True(t, seen(3000, 3000)(), "the last state is reported at the end")

	stop = b.watchDownload(dir, 500)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "broken.deb"), make([]byte, 200), 0o644))
	require.Eventually(t, seen(3200, 3500), 10*time.Second, time.Millisecond)
	stop(false)
	stop = b.watchDownload(dir, 500) // the retry
	require.NoError(t, os.WriteFile(filepath.Join(dir, "lib.deb"), make([]byte, 500), 0o644))
	stop(true)
	require.True(t, seen(3500, 3500)(), "the failed try is not counted")
}

// A real apt-get downloads a package from a Debian repository served on
// loopback, and the builder reports it as it grows: apt's announced size
// as the total, a partial count while the package is half sent (the
// server holds the second half back until then), and all of it at the
// end.
func TestAptDownloadProgress(t *testing.T) {
	for _, tool := range []string{"apt-get", "dpkg-deb", "apt-ftparchive"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s: %v", tool, err)
		}
	}
	dir := t.TempDir()
	repo, dl := filepath.Join(dir, "repo"), filepath.Join(dir, "dl")
	pkg := filepath.Join(dir, "pkg")
	for _, d := range []string{repo, dl, filepath.Join(pkg, "DEBIAN"), filepath.Join(pkg, "opt"),
		filepath.Join(dir, "lists", "partial"), filepath.Join(dir, "cache", "archives", "partial")} {
		require.NoError(t, os.MkdirAll(d, 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(pkg, "DEBIAN", "control"),
		[]byte("Package: govmm-progress-test\nVersion: 1.0\nArchitecture: all\nMaintainer: govmm <govmm@example.com>\nDescription: test\n"), 0o644))
	blob := make([]byte, 4<<20)
	_, err := rand.Read(blob) // incompressible: the .deb is as big
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(pkg, "opt", "blob"), blob, 0o644))
	deb := filepath.Join(repo, "govmm-progress-test_1.0_all.deb")
	run := func(cmd *exec.Cmd) []byte {
		t.Helper()
		out, err := cmd.Output()
		require.NoError(t, err, "%v", cmd.Args)
		return out
	}
	run(exec.Command("dpkg-deb", "-Znone", "--build", pkg, deb))
	scan := exec.Command("apt-ftparchive", "packages", ".")
	scan.Dir = repo
	require.NoError(t, os.WriteFile(filepath.Join(repo, "Packages"), run(scan), 0o644))
	st, err := os.Stat(deb)
	require.NoError(t, err)
	size := st.Size()

	// The repository: the package's first half at once, the rest once the
	// test has seen a partial count.
	sawPartial, release := make(chan struct{}), make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		data, err := os.ReadFile(filepath.Join(repo, filepath.Base(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if !strings.HasSuffix(r.URL.Path, ".deb") {
			_, _ = w.Write(data)
			return
		}
		_, _ = w.Write(data[:len(data)/2])
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		_, _ = w.Write(data[len(data)/2:])
	}))
	defer srv.Close()
	list := filepath.Join(dir, "sources.list")
	require.NoError(t, os.WriteFile(list, []byte("deb [trusted=yes] "+srv.URL+"/ ./\n"), 0o644))
	conf := filepath.Join(dir, "apt.conf")
	require.NoError(t, os.WriteFile(conf, []byte(fmt.Sprintf(`Dir::Etc::SourceList "%s";
Dir::Etc::SourceParts "/dev/null";
Dir::State::Lists "%s";
Dir::Cache "%s";
Dir::State::status "/dev/null";
Acquire::Languages "none";
Acquire::http::Proxy "DIRECT";
`, list, filepath.Join(dir, "lists"), filepath.Join(dir, "cache"))), 0o644))
	t.Setenv("APT_CONFIG", conf)
	run(exec.Command("apt-get", "update", "-q"))

	var mu sync.Mutex
	var got [][2]int64
	var once sync.Once
	b := &builder{log: io.Discard, progress: func(done, total int64) {
		mu.Lock()
		got = append(got, [2]int64{done, total})
		mu.Unlock()
		if done > 0 && done < total {
			once.Do(func() { close(sawPartial) })
		}
	}}
	go func() {
		select {
		case <-sawPartial:
		case <-time.After(time.Minute): // the test fails below
		}
		close(release)
	}()
	require.NoError(t, b.aptDownload(t.Context(), dl, []string{"govmm-progress-test"}))
	select {
	case <-sawPartial:
	default:
		t.Fatalf("no partial count while the package was half sent: %v", got)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, g := range got {
		assert.Equal(t, size, g[1], "the total is apt's announced size")
	}
	assert.Equal(t, [2]int64{size, size}, got[len(got)-1], "all of it at the end")
	on, err := os.ReadFile(filepath.Join(dl, filepath.Base(deb)))
	require.NoError(t, err)
	want, err := os.ReadFile(deb)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, on), "apt-get downloaded the package whole")
}
