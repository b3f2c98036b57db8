package main

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
)

// metricValue finds one sample in Prometheus text.
func metricValue(t *testing.T, text, sample string) float64 {
	t.Helper()
	for _, l := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(l, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err, l)
			return f
		}
	}
	t.Fatalf("no %s in:\n%s", sample, text)
	return 0
}

// govmm_vcpu_exits_total goes on counting while a guest runs, even one
// that makes no exits govmm sees itself (a counter loop: only KVM's own
// exits, such as the host's timer interrupts, happen).
func TestMetricsVCPUExitsAdvance(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	sock := filepath.Join(dir, "vm.sock")
	startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock)
	waitSocket(t, sock)
	metrics := func() string {
		out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sock, "metrics")
		require.Equal(t, 0, status, errOut)
		return out
	}
	const exits = `govmm_vcpu_exits_total{vcpu="0"}`
	first := metrics()
	before := metricValue(t, first, exits)
	userBefore := metricValue(t, first, `govmm_vcpu_userspace_exits_total{reason="IO"}`)
	require.Eventually(t, func() bool { return metricValue(t, metrics(), exits) > before }, 30*time.Second, 50*time.Millisecond,
		"%s stood still at %v", exits, before)
	require.Equal(t, userBefore, metricValue(t, metrics(), `govmm_vcpu_userspace_exits_total{reason="IO"}`),
		"the counter loop makes no port I/O")
}
