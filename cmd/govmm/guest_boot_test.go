package main

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/guestimg"
	"govmm/internal/kvmtest"
)

// kernelPlace is what the guest says about where its kernel runs: the
// virtual address of _text and the physical start of "Kernel code".
var kernelPlace = regexp.MustCompile(`(?m)^([0-9a-f]{16}) T _text\n\s*([0-9a-f]+)-[0-9a-f]+ : Kernel code$`)

// The default image's bzImage, given as --kernel, boots both ways, each
// seen from inside the guest: with --kernel-entry auto its uncompressed
// kernel (extracted into the cache on first use) is entered through PVH,
// so the kernel runs where its ELF file put it (no decompressor ran to
// move it: _text at 0xffffffff81000000, code at 16 MiB); with
// --kernel-entry bzimage its decompressor runs in the guest and, Debian's
// kernel having KASLR, moves it.
func TestGuestBzImageEntries(t *testing.T) {
	kvmtest.RequireLinuxBoot(t)
	img, err := guestimg.Build(context.Background(), guestimg.Options{})
	require.NoError(t, err)
	t.Setenv("GOVMM_LOG", "info")
	script := `grep -w _text /proc/kallsyms; grep "Kernel code" /proc/iomem`
	place := func(entry string) (virt, phys, log string) {
		t.Helper()
		start := time.Now()
		out, errOut, status := govmm(t, 8*time.Minute, "run", "--kernel", img.Kernel, "--kernel-entry", entry,
			"--net", "none", "--api-sock", "", "--", "sh", "-c", script)
		require.Equal(t, 0, status, "--kernel-entry %s: stderr: %s", entry, errOut)
		m := kernelPlace.FindStringSubmatch(out)
		require.NotNil(t, m, "--kernel-entry %s: the guest said %q", entry, out)
		t.Logf("--kernel-entry %s: _text at %s, Kernel code at %s (%v)", entry, m[1], m[2], time.Since(start).Round(100*time.Millisecond))
		return m[1], m[2], errOut
	}

	virt, phys, log := place("auto")
	require.Contains(t, log, "the bzImage's uncompressed kernel, entered through PVH")
	require.Equal(t, "ffffffff81000000", virt, "PVH: the kernel at its link address")
	require.Equal(t, "01000000", phys, "PVH: the kernel at its ELF file's physical address")

	virt, phys, log = place("bzimage")
	require.NotContains(t, log, "entered through PVH")
	require.False(t, virt == "ffffffff81000000" && phys == "01000000",
		"the decompressor ran and randomised the kernel's place (KASLR): _text %s, code %s", virt, phys)
}
