package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/ctlapi"
	"govmm/internal/kvmtest"
	"govmm/internal/promcheck"
	"govmm/internal/tinyguest"
)

// scrape GETs http://addr/metrics as Prometheus would and checks the page
// with the Prometheus parser (and promcheck's stricter checks).
func scrape(t *testing.T, addr string) (string, map[string]*dto.MetricFamily) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)
	require.Equal(t, ctlapi.PrometheusContentType, resp.Header.Get("Content-Type"))
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	fams, err := promcheck.Parse(string(b))
	require.NoError(t, err, "%s", b)
	return string(b), fams
}

func familyValue(t *testing.T, fams map[string]*dto.MetricFamily, name string) float64 {
	t.Helper()
	f, ok := fams[name]
	require.True(t, ok, "no family %s", name)
	m := f.GetMetric()[0]
	switch {
	case m.Counter != nil:
		return m.GetCounter().GetValue()
	case m.Gauge != nil:
		return m.GetGauge().GetValue()
	}
	return m.GetUntyped().GetValue()
}

func infoJSON(t require.TestingT, sock string) ctlapi.Info {
	helper(t)
	out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sock, "info", "--json")
	require.Equal(t, 0, status, errOut)
	var info ctlapi.Info
	require.NoError(t, json.Unmarshal([]byte(out), &info))
	return info
}

// rawSeconds is a value of ctl stats printed as raw seconds (the issue's
// "0.000539722"), which the table must not show.
var rawSeconds = regexp.MustCompile(`\s0\.0\d{3,}`)

// A standby is observable from its start: ctl info and ctl stats on its
// --api-sock, and its metrics on --metrics-listen, say what it receives
// (peer, last checkpoint, lag, bytes, witness), in units a person reads.
// The primary's metrics are scraped over TCP and parse as Prometheus text
// with its pause and ack histograms. After a takeover, the same socket
// (the same file) and the same port serve the running VM.
func TestStandbyObservableAndMetricsListen(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	pMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbSock, pSock := filepath.Join(dir, "sb.sock"), filepath.Join(dir, "p.sock")

	startVM(t, "standby", "--listen", addr, "--net", "none", "--api-sock", sbSock, "--metrics-listen", sbMetrics,
		"--failover-timeout", "1s")
	waitStandingBy(t, sbSock)
	sockBefore, err := os.Stat(sbSock)
	require.NoError(t, err)
	out, errOut, status := ctl(sbSock, "info")
	require.Equal(t, 0, status, errOut)
	t.Logf("standby, listening:\n%s", out)
	assert.Regexp(t, `(?m)^replication\s+standby, listening$`, out)
	assert.Regexp(t, `(?m)^checkpoint\s+none yet$`, out)
	assert.Regexp(t, `(?m)^received\s+0 B$`, out)
	assert.Regexp(t, `(?m)^witness\s+none$`, out)
	_, fams := scrape(t, sbMetrics)
	assert.Equal(t, 0.0, familyValue(t, fams, "govmm_standby_following"))

	prim := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
		"--api-sock", pSock, "--metrics-listen", pMetrics, "--replicate-to", addr, "--epoch", "20ms", "--failover-timeout", "1s")
	waitSocket(t, pSock)
	var info ctlapi.Info
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		info = infoJSON(c, sbSock)
		require.NotNil(c, info.Standby)
		assert.Greater(c, info.Standby.Checkpoint, uint64(5))
	}, 30*time.Second, 50*time.Millisecond, "the standby commits checkpoints")
	sb := info.Standby
	assert.Equal(t, "replicating", sb.Phase)
	assert.Equal(t, "", sb.Witness)
	assert.Greater(t, sb.BytesReceived, uint64(64*4096), "the dirtier's pages arrived")
	assert.Greater(t, sb.Lag, time.Duration(0))
	assert.Less(t, sb.Lag, 5*time.Second, "checkpoints commit every 20ms")
	host, _, err := net.SplitHostPort(info.Peer)
	require.NoError(t, err, "peer %q", info.Peer)
	assert.Equal(t, "127.0.0.1", host)
	assert.Contains(t, info.Role, "standby, replicating govmm")

	out, errOut, status = ctl(sbSock, "info")
	require.Equal(t, 0, status, errOut)
	t.Logf("standby, replicating:\n%s", out)
	assert.Regexp(t, `(?m)^replication\s+standby, replicating govmm, checkpoint \d+, peer 127\.0\.0\.1:\d+$`, out)
	assert.Regexp(t, `(?m)^checkpoint\s+\d+ \(committed [0-9.]+(ns|µs|ms|s) ago\)$`, out)
	assert.Regexp(t, `(?m)^received\s+[0-9.]+ (KiB|MiB)$`, out)
	out, errOut, status = ctl(sbSock, "stats")
	require.Equal(t, 0, status, errOut)
	assert.Regexp(t, `(?m)^govmm_standby_received_bytes_total\s+-\s+[0-9.]+ (KiB|MiB)$`, out)
	assert.Regexp(t, `(?m)^govmm_standby_lag_seconds\s+-\s+[0-9.]+(ns|µs|ms|s)$`, out)
	_, fams = scrape(t, sbMetrics)
	assert.Equal(t, 1.0, familyValue(t, fams, "govmm_standby_following"))
	assert.Greater(t, familyValue(t, fams, "govmm_standby_received_bytes_total"), float64(64*4096))

	// The primary over TCP: the page Prometheus scrapes, the same
	// families as ctl metrics on the socket, pause and ack histograms.
	waitAckedPast(t, pSock)
	text, fams := scrape(t, pMetrics)
	pause := fams["govmm_replication_pause_seconds"]
	require.NotNil(t, pause, text)
	require.Equal(t, dto.MetricType_HISTOGRAM, pause.GetType())
	h := pause.GetMetric()[0].GetHistogram()
	assert.Greater(t, h.GetSampleCount(), uint64(5))
	assert.Greater(t, h.GetSampleSum(), 0.0)
	assert.Len(t, h.GetBucket(), 17)
	ack := fams["govmm_replication_ack_seconds"]
	require.NotNil(t, ack)
	assert.Greater(t, ack.GetMetric()[0].GetHistogram().GetSampleCount(), uint64(0))
	assert.NotContains(t, text, "quantile")
	viaSock, errOut, status := ctl(pSock, "metrics")
	require.Equal(t, 0, status, errOut)
	sockFams, err := promcheck.Parse(viaSock)
	require.NoError(t, err)
	for name := range sockFams {
		assert.Contains(t, fams, name, "TCP and socket serve the same families")
	}
	assert.Len(t, fams, len(sockFams))

	out, errOut, status = ctl(pSock, "stats")
	require.Equal(t, 0, status, errOut)
	t.Logf("primary ctl stats:\n%s", out)
	assert.Regexp(t, `(?m)^govmm_replication_pause_seconds\s+-\s+n=\d+ mean=[0-9.]+(ns|µs|ms|s) p50<=[0-9.]+(µs|ms|s) p99[<>]=?[0-9.]+(µs|ms|s)$`, out)
	assert.Regexp(t, `(?m)^govmm_uptime_seconds\s+-\s+[0-9.hm]+(ms|s)$`, out)
	assert.NotRegexp(t, rawSeconds, out, "no raw seconds")
	assert.NotContains(t, out, "_bucket", "a histogram is one line")
	raw, errOut, status := ctl(pSock, "stats", "--json")
	require.Equal(t, 0, status, errOut)
	var st ctlapi.Stats
	require.NoError(t, json.Unmarshal([]byte(raw), &st), "stats --json is the API's JSON")
	require.NotEmpty(t, st.Metrics)

	// Takeover: the same socket file and the same port serve the VM.
	require.NoError(t, syscall.Kill(-prim.Process.Pid, syscall.SIGKILL))
	waitGuestHere(t, sbSock)
	sockAfter, err := os.Stat(sbSock)
	require.NoError(t, err)
	assert.True(t, os.SameFile(sockBefore, sockAfter), "the standby's socket keeps serving, not a new one")
	info = infoJSON(t, sbSock)
	assert.Nil(t, info.Standby)
	assert.Contains(t, info.Role, "took over at checkpoint")
	_, fams = scrape(t, sbMetrics)
	assert.Contains(t, fams, "govmm_vcpu_exits_total", "the port serves the VM's metrics now")
	assert.NotContains(t, fams, "govmm_standby_following")
}

// --metrics-listen is checked before anything starts: what is not
// HOST:PORT is a usage error (status 2) that names the flag; a port in use
// is one line that names it too.
func TestMetricsListenRefusesBadAddress(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Counter(counterGPA))
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	tests := []struct {
		name       string
		args       []string
		wantStatus int
		wantFirst  string
	}{
		{"run, no port", []string{"run", "--metrics-listen", "9100"}, 2,
			`govmm: run: --metrics-listen 9100: want HOST:PORT (see 'govmm help run')`},
		{"run, port out of range", []string{"run", "--metrics-listen", "127.0.0.1:99999"}, 2,
			`govmm: run: --metrics-listen 127.0.0.1:99999: want HOST:PORT with a port from 0 to 65535 (see 'govmm help run')`},
		{"run, port in use", []string{"run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none",
			"--api-sock", "", "--metrics-listen", busy.Addr().String()}, 1,
			fmt.Sprintf("govmm: --metrics-listen %s: listen tcp %s: bind: address already in use", busy.Addr(), busy.Addr())},
		{"standby, no port", []string{"standby", "--listen", listen, "--net", "none", "--metrics-listen", "localhost"}, 2,
			`govmm: standby: --metrics-listen localhost: want HOST:PORT (see 'govmm help standby')`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, errOut, status := govmm(t, time.Minute, tt.args...)
			assert.Equal(t, tt.wantStatus, status, errOut)
			first, _, _ := strings.Cut(errOut, "\n")
			assert.Equal(t, tt.wantFirst, first, errOut)
		})
	}
}

// Migrating a replicated VM: refused without --force, in one line that
// says protection would be dropped; with --force, replication stops (the
// standby discards its replica and exits), the guest moves and runs on at
// the destination, and ctl warns that it runs there unprotected.
func TestCtlMigrateReplicatedNeedsForce(t *testing.T) {
	kvmtest.Require(t)
	dir := t.TempDir()
	kernel, initrd := tinyGuestFiles(t, dir, tinyguest.Dirtier(0x400000, 64, counterGPA))
	ctl := func(sock string, args ...string) (string, string, int) {
		return govmm(t, time.Minute, append([]string{"ctl", "--api-sock", sock}, args...)...)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbLog := &logBuffer{}
	sb := exec.Command(govmmBin, "standby", "--listen", addr, "--net", "none")
	sb.Stderr = sbLog
	sb.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, sb.Start())
	sbExited := make(chan struct{})
	var sbErr error
	go func() { sbErr = sb.Wait(); close(sbExited) }()
	t.Cleanup(func() { _ = syscall.Kill(-sb.Process.Pid, syscall.SIGKILL); <-sbExited })
	require.Eventually(t, func() bool { return strings.Contains(sbLog.String(), "listening") }, 30*time.Second, 10*time.Millisecond)

	sock := filepath.Join(dir, "p.sock")
	src := startVM(t, "run", "--kernel", kernel, "--initrd", initrd, "--mem", "64M", "--net", "none", "--api-sock", sock, "--epoch", "20ms")
	waitSocket(t, sock)
	_, errOut, status := ctl(sock, "replicate", "--to", addr)
	require.Equal(t, 0, status, errOut)

	dstAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	dst := filepath.Join(dir, "dst.sock")
	startVM(t, "standby", "--listen", dstAddr, "--net", "none", "--api-sock", dst)
	waitStandingBy(t, dst)

	_, errOut, status = ctl(sock, "migrate", "--to", dstAddr)
	require.Equal(t, 1, status)
	first, _, _ := strings.Cut(errOut, "\n")
	require.Equal(t, fmt.Sprintf("govmm: migrate: conflict: the guest is protected by the standby at %s and migrating would drop that protection (it would run UNPROTECTED at %s); use --force to migrate anyway",
		addr, dstAddr), first)
	out, _, _ := ctl(sock, "info")
	require.Contains(t, out, "primary (protected)", "refused: still protected")
	out, _, _ = ctl(dst, "info")
	require.Contains(t, out, "standby, listening", "the destination got nothing")

	before := filepath.Join(dir, "before.snap")
	_, errOut, status = ctl(sock, "snapshot", "--out", before)
	require.Equal(t, 0, status, errOut)
	c0 := snapshotCounter(t, before)

	out, errOut, status = ctl(sock, "migrate", "--to", dstAddr, "--force")
	require.Equal(t, 0, status, errOut)
	require.Contains(t, out, "migrated to "+dstAddr)
	require.Contains(t, errOut, fmt.Sprintf("govmm ctl: warning: the guest runs UNPROTECTED at %s: replication to %s was stopped for the migration", dstAddr, addr))

	// The old standby discarded its replica and exited; it runs nothing.
	select {
	case <-sbExited:
		require.Error(t, sbErr, "the standby exits with an error status")
	case <-time.After(30 * time.Second):
		t.Fatal("the old standby still runs after its replication was stopped")
	}
	require.Contains(t, sbLog.String(), "replica is discarded")
	srcDone := make(chan error, 1)
	go func() { srcDone <- src.Wait() }()
	select {
	case <-srcDone:
	case <-time.After(30 * time.Second):
		t.Fatal("the source VMM did not exit after migrating")
	}

	waitGuestHere(t, dst)
	out, _, _ = ctl(dst, "info")
	require.Contains(t, out, "migrated in")
	require.NotContains(t, out, "protected")
	after := filepath.Join(dir, "after.snap")
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Greater(c, snapshotCounterAt(c, dst, after), c0)
	}, 30*time.Second, 20*time.Millisecond, "the guest runs on at the destination")
}
