package main

import (
	"os"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
)

// The guest's file system hands freed blocks back to the host: the guest
// writes 16 MiB of random data to its disk and syncs it, deletes it and
// runs fstrim; virtio-blk's DISCARD punches holes in the image, so the
// host's copy takes less than the 16 MiB that reached it. Without
// discards (TestGuestNoDiscardKeepsImageAllocated) the blocks would stay
// allocated after the rm.
//
// The guest runs fstrim twice: its sync can return before ext4 has handed
// the deleted file's blocks back to its allocator (jbd2 marks the commit
// done before it runs the commit callback that frees them), and fstrim
// skips blocks the allocator still holds; one CI run in sixteen saw it.
// The second fstrim, after another sync, trims what the first could not
// (ext4 skips the groups it already trimmed that saw no frees since).
func TestGuestFstrimPunchesHoles(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	disk := blankDisk(t)
	script := "dd if=/dev/urandom of=/data/junk bs=64k count=256 2>/dev/null && sync && " +
		"ls -l /data/junk && rm /data/junk && sync && fstrim -v /data && sync && fstrim -v /data"
	out, errOut, status := govmm(t, 5*time.Minute, "run", "--net", "none", "--disk", disk, "--", "sh", "-c", script)
	require.Zero(t, status, "stdout: %s\nstderr: %s", out, errOut)
	require.Contains(t, out, " 16777216 ", "the 16 MiB file was written: %s", out)
	runs := regexp.MustCompile(`/data: (\d+) bytes trimmed`).FindAllStringSubmatch(out, -1)
	require.Len(t, runs, 2, "fstrim -v output: %s", out)
	var trimmed int64
	for _, m := range runs {
		n, err := strconv.ParseInt(m[1], 10, 64)
		require.NoError(t, err)
		trimmed += n
	}
	require.GreaterOrEqual(t, trimmed, int64(16<<20), "fstrim discarded at least the freed file")
	held := allocatedBytes(t, disk)
	fi, err := os.Stat(disk)
	require.NoError(t, err)
	t.Logf("fstrim trimmed %d MiB (%s then %s bytes); the %d MiB image holds %d KiB",
		trimmed>>20, runs[0][1], runs[1][1], fi.Size()>>20, held>>10)
	require.Equal(t, int64(64<<20), fi.Size(), "the image keeps its size")
	require.Less(t, held, int64(12<<20), "the freed 16 MiB were punched out of the image")
}

// allocatedBytes is what the file at path has allocated on its file
// system (holes take nothing).
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(path, &st))
	return st.Blocks * 512
}

// A disk given with nodiscard stays allocated: on an image allocated in
// full beforehand, the guest sees no discard support (its fstrim fails)
// and after its 16 MiB file is written and deleted, and mkfs zeroed its
// inode tables (WRITE_ZEROES, zeroed in place), the image still holds
// every block.
func TestGuestNoDiscardKeepsImageAllocated(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	disk := blankDisk(t)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	require.NoError(t, err)
	require.NoError(t, syscall.Fallocate(int(f.Fd()), 0, 0, 64<<20))
	require.NoError(t, f.Close())
	require.GreaterOrEqual(t, allocatedBytes(t, disk), int64(64<<20))
	script := "dd if=/dev/urandom of=/data/junk bs=64k count=256 2>/dev/null && sync && " +
		"ls -l /data/junk && rm /data/junk && sync; fstrim -v /data; echo fstrim=$?"
	out, errOut, status := govmm(t, 5*time.Minute, "run", "--net", "none", "--disk", disk+",nodiscard", "--", "sh", "-c", script)
	require.Zero(t, status, "stdout: %s\nstderr: %s", out, errOut)
	require.Contains(t, out, " 16777216 ", "the 16 MiB file was written: %s", out)
	require.Regexp(t, `fstrim=[1-9]`, out, "the guest cannot discard")
	require.NotContains(t, out, "bytes trimmed")
	t.Logf("the 64 MiB image holds %d KiB", allocatedBytes(t, disk)>>10)
	require.GreaterOrEqual(t, allocatedBytes(t, disk), int64(64<<20), "no block was given back")
}
