package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

// govmm ctl migrate moves a running guest to a govmm standby over an
// authenticated stream; the source exits, the guest's counter goes on at
// the destination. A standby with another key is refused and the source
// keeps the guest. The source tracks dirty pages with the dirty ring, the
// standbys with the default: tracking is local to each end.
func TestCtlMigrate(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 256, counterGPA))
	key := filepath.Join(dir, "key")
	require.NoError(t, os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef"), 0o600))
	otherKey := filepath.Join(dir, "other")
	require.NoError(t, os.WriteFile(otherKey, []byte("fedcba9876543210fedcba9876543210"), 0o600))

	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	src := filepath.Join(dir, "src.sock")
	srcCmd := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--cpus", "2",
		"--net", "none", "--api-sock", src, "--key-file", key, "--dirty-tracking", "ring", "--stream-cipher", "aegis-128x2")
	waitSocket(t, src)

	// A stranger: the standby holds another key.
	port := freePort(t)
	stranger := filepath.Join(dir, "stranger.sock")
	startVM(t, "standby", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--net", "none", "--key-file", otherKey, "--api-sock", stranger)
	waitStandingBy(t, stranger)
	_, errOut, status := ctl(src, "migrate", "--to", fmt.Sprintf("127.0.0.1:%d", port))
	require.NotEqual(t, 0, status)
	require.Contains(t, errOut, "auth")
	_, _, status = ctl(src, "info")
	require.Equal(t, 0, status, "the source still runs its guest")

	// The right key, but a standby that seals only with AES-256-GCM, and
	// a source that requires AEGIS-128X2: refused, and said so.
	port = freePort(t)
	gcmOnly := filepath.Join(dir, "gcm.sock")
	startVM(t, "standby", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--net", "none", "--key-file", key,
		"--stream-cipher", "aes-256-gcm", "--api-sock", gcmOnly)
	waitStandingBy(t, gcmOnly)
	_, errOut, status = ctl(src, "migrate", "--to", fmt.Sprintf("127.0.0.1:%d", port))
	require.NotEqual(t, 0, status)
	require.Contains(t, errOut, "aegis-128x2")
	_, _, status = ctl(src, "info")
	require.Equal(t, 0, status, "the source still runs its guest")

	before := filepath.Join(dir, "before.snap")
	_, errOut, status = ctl(src, "snapshot", "--out", before)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, before)

	// A standby of the default cipher (auto): the migration runs under
	// AEGIS-128X2, which the source requires.
	port = freePort(t)
	dst := filepath.Join(dir, "dst.sock")
	startVM(t, "standby", "--listen", fmt.Sprintf("127.0.0.1:%d", port), "--net", "none", "--key-file", key, "--api-sock", dst)
	waitStandingBy(t, dst)
	out, errOut, status := ctl(src, "migrate", "--to", fmt.Sprintf("127.0.0.1:%d", port))
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "downtime")
	t.Logf("ctl migrate:\n%s", out)

	// The source VMM exits by itself once it handed over.
	exited := make(chan error, 1)
	go func() { exited <- srcCmd.Wait() }()
	select {
	case err := <-exited:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("the source VMM did not exit after migrating")
	}

	waitGuestHere(t, dst)
	after := filepath.Join(dir, "after.snap")
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, dst, after), c0)
	}, 30*time.Second, 20*time.Millisecond, "the guest runs on at the destination")
}
