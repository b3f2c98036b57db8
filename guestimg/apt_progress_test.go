package guestimg

import (
	"os"
	"path/filepath"
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
