package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/ctlapi"
	"govmm/internal/kvmtest"
	"govmm/internal/promcheck"
	"govmm/internal/tinyguest"
	"govmm/vmm"
)

// metricValue finds one sample in Prometheus text.
func metricValue(t require.TestingT, text, sample string) float64 {
	helper(t)
	for _, l := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(l, sample+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err, l)
			return f
		}
	}
	require.Failf(t, "no sample", "no %s in:\n%s", sample, text)
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
	metrics := func(t require.TestingT) string {
		out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sock, "metrics")
		require.Equal(t, 0, status, errOut)
		return out
	}
	const exits = `govmm_vcpu_exits_total{vcpu="0"}`
	first := metrics(t)
	before := metricValue(t, first, exits)
	userBefore := metricValue(t, first, `govmm_vcpu_userspace_exits_total{reason="IO"}`)
	require.EventuallyWithT(t, func(c *assert.CollectT) { assert.Greater(c, metricValue(c, metrics(c), exits), before) },
		30*time.Second, 50*time.Millisecond, "%s stood still at %v", exits, before)
	require.Equal(t, userBefore, metricValue(t, metrics(t), `govmm_vcpu_userspace_exits_total{reason="IO"}`),
		"the counter loop makes no port I/O")
}

// textInitrd is an initramfs of n pages of text: no zero word, so that a
// one-byte change makes a page whose XOR delta wins, and compressible.
func textInitrd(n int) []byte {
	var b []byte
	for i := 0; len(b) < n*4096; i++ {
		b = fmt.Appendf(b, "line %6d of a page the dirtier bumps one byte of, over and over\n", i)
	}
	return b[:n*4096]
}

// The stream's page counters reach /metrics and ctl stats on both ends,
// with the codec and deltas the two ends agreed on; what the primary sent
// is what the standby received, page for page, once the guest is paused
// and the last checkpoint is in; and ctl stats derives the wire bytes per
// dirty page from them. A tiny guest bumps one byte in each of 64 pages of
// text (its initramfs), with --stream-compress none and no deltas, then
// with s2 and deltas.
func TestStreamCountersInMetricsAndStats(t *testing.T) {
	kvmtest.Require(t)
	for _, tt := range []struct {
		compress string
		deltas   bool
	}{{"none", false}, {"s2", true}} {
		t.Run(fmt.Sprintf("%s,deltas=%v", tt.compress, tt.deltas), func(t *testing.T) {
			testStreamCounters(t, tt.compress, tt.deltas)
		})
	}
}

func testStreamCounters(t *testing.T, compress string, deltas bool) {
	const pages, mem = 64, 64 << 20
	dir := t.TempDir()
	initrd := textInitrd(pages)
	k, err := vmm.ParseBzImage(tinyguest.Kernel(nil))
	require.NoError(t, err)
	base, err := vmm.InitrdPlacement(k, mem, uint64(len(initrd)))
	require.NoError(t, err)
	kernel := filepath.Join(dir, "guest.bzImage")
	require.NoError(t, os.WriteFile(kernel, tinyguest.Kernel(tinyguest.Dirtier(base, pages, counterGPA)), 0o644))
	initrdPath := filepath.Join(dir, "initrd")
	require.NoError(t, os.WriteFile(initrdPath, initrd, 0o644))

	streamFlags := []string{"--stream-compress", compress}
	if deltas {
		streamFlags = append(streamFlags, "--stream-deltas")
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	pMetrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sbSock, pSock := filepath.Join(dir, "sb.sock"), filepath.Join(dir, "p.sock")
	startVM(t, append([]string{"standby", "--listen", addr, "--net", "none", "--api-sock", sbSock}, streamFlags...)...)
	waitStandingBy(t, sbSock)
	startVM(t, append([]string{"run", "--kernel", kernel, "--initrd", initrdPath, "--mem", "64M", "--net", "none",
		"--api-sock", pSock, "--metrics-listen", pMetrics, "--replicate-to", addr, "--epoch", "20ms"}, streamFlags...)...)
	waitSocket(t, pSock)
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		info := infoJSON(c, sbSock)
		require.NotNil(c, info.Standby)
		assert.Greater(c, info.Standby.Checkpoint, uint64(10))
	}, 30*time.Second, 50*time.Millisecond, "the standby commits checkpoints")

	// Prometheus' view of the primary: the info metric and counters.
	_, fams := scrape(t, pMetrics)
	info := fams["govmm_stream_info"]
	require.NotNil(t, info)
	labels := map[string]string{}
	for _, l := range info.GetMetric()[0].GetLabel() {
		labels[l.GetName()] = l.GetValue()
	}
	assert.Equal(t, map[string]string{"compression": compress, "deltas": strconv.FormatBool(deltas), "cipher": "none"}, labels, "unkeyed: nothing sealed")
	for _, name := range []string{"pages", "zero_pages", "delta_pages", "copy_pages", "page_bytes", "page_wire_bytes"} {
		f := fams["govmm_stream_sent_"+name+"_total"]
		require.NotNil(t, f, name)
		assert.Equal(t, dto.MetricType_COUNTER, f.GetType(), name)
	}
	assert.Greater(t, familyValue(t, fams, "govmm_stream_sent_page_wire_bytes_total"), 0.0)

	// Paused, the guest dirties nothing: once the last checkpoint is in,
	// the standby has received every page the primary sent. The
	// primary's counters are read before and after the standby's and
	// must not have moved in between: a checkpoint going out meanwhile
	// (the VMM's own writes after the pause) reaches the standby, which
	// counts a frame's deltas page by page as it decodes them and its
	// pages once the frame is staged; read mid-frame, it showed more
	// deltas than the primary had sent at its read, its pages still
	// equal (seen once in CI: 786 against 768). Only the page counters
	// must hold still: a paused guest is still checkpointed every epoch,
	// each checkpoint carrying its state, so the state's counters move
	// every 20 ms, faster than three ctl calls in the lab (2026-12-05:
	// every try for 30 s saw them move).
	_, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", pSock, "pause")
	require.Equal(t, 0, status, errOut)
	var p, sb map[string]float64
	var pStats ctlapi.Stats
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		pStats = statsJSON(c, pSock)
		p, sb = samples(pStats), samples(statsJSON(c, sbSock))
		after := samples(statsJSON(c, pSock))
		for name, v := range p {
			if strings.HasPrefix(name, "govmm_stream_sent_") && strings.Contains(name, "page") {
				assert.Equal(c, v, after[name], "%s holds still", name)
			}
		}
		assert.Equal(c, p["govmm_stream_sent_pages_total"], sb["govmm_stream_received_pages_total"])
		assert.Equal(c, p["govmm_replication_epoch"], p["govmm_replication_acked_epoch"])
	}, 30*time.Second, 50*time.Millisecond, "the standby receives what the primary sent")
	t.Logf("primary %v", p)
	assert.Equal(t, p["govmm_stream_sent_zero_pages_total"], sb["govmm_stream_received_zero_pages_total"])
	assert.Equal(t, p["govmm_stream_sent_delta_pages_total"], sb["govmm_stream_received_delta_pages_total"])
	assert.Equal(t, p["govmm_stream_sent_copy_pages_total"], sb["govmm_stream_received_copy_pages_total"])
	assert.Greater(t, p["govmm_replication_dirty_pages_total"], float64(10*pages), "checkpoints carry the dirtier's pages")
	raw, wire := p["govmm_stream_sent_page_bytes_total"], p["govmm_stream_sent_page_wire_bytes_total"]
	if deltas {
		// The first checkpoints after the sync ship each page whole, then
		// deltas (or copies, where a page's bytes are shipped already):
		// most of the dirtier's pages travel as one or the other.
		assert.Greater(t, p["govmm_stream_sent_delta_pages_total"]+p["govmm_stream_sent_copy_pages_total"],
			p["govmm_replication_dirty_pages_total"]/2)
	} else {
		assert.Zero(t, p["govmm_stream_sent_delta_pages_total"])
		assert.Zero(t, p["govmm_stream_sent_copy_pages_total"])
	}
	if compress == "none" {
		// Stored: each Pages frame is its section and an 8-byte header.
		frames := (wire - raw) / 8
		assert.Positive(t, frames)
		assert.Equal(t, frames, math.Trunc(frames), "wire %v - raw %v is whole headers", wire, raw)
		assert.LessOrEqual(t, frames, p["govmm_stream_sent_pages_total"])
	} else {
		assert.Less(t, wire, raw/4, "s2 over deltas of text pages")
	}
	text, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sbSock, "metrics")
	require.Equal(t, 0, status, errOut)
	sbFams, err := promcheck.Parse(text)
	require.NoError(t, err, text)
	require.NotNil(t, sbFams["govmm_stream_info"], text)
	sbLabels := map[string]string{}
	for _, l := range sbFams["govmm_stream_info"].GetMetric()[0].GetLabel() {
		sbLabels[l.GetName()] = l.GetValue()
	}
	assert.Equal(t, labels, sbLabels, "both ends report the codec they agreed on")
	assert.Equal(t, dto.MetricType_COUNTER, sbFams["govmm_stream_received_delta_pages_total"].GetType())

	// Derived: the bench's wire bytes per dirty page, from the counters.
	derived := map[string]float64{}
	for _, d := range pStats.Derived {
		derived[d.Name] = d.Value
	}
	sbSt := statsJSON(t, sbSock)
	sbNow, sbDerived := samples(sbSt), map[string]float64{}
	for _, d := range sbSt.Derived {
		sbDerived[d.Name] = d.Value
	}
	assert.InDelta(t, sbNow["govmm_stream_received_delta_pages_total"]/(sbNow["govmm_stream_received_pages_total"]-sbNow["govmm_stream_received_zero_pages_total"]),
		sbDerived["pages received as deltas"], 1e-9, "the standby's share of pages received as deltas")
	perPage := p["govmm_replication_bytes_total"] / p["govmm_replication_dirty_pages_total"]
	assert.InDelta(t, perPage, derived["wire bytes per dirty page"], perPage*1e-9)
	assert.InDelta(t, wire/raw, derived["page bytes on the wire / raw"], 1e-9)
	out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", pSock, "stats")
	require.Equal(t, 0, status, errOut)
	t.Logf("primary ctl stats:\n%s", out)
	assert.Regexp(t, `(?m)^govmm_stream_sent_page_wire_bytes_total\s+-\s+[0-9.]+ (B|KiB|MiB|GiB)$`, out)
	assert.Regexp(t, `(?m)^govmm_stream_info\s+cipher="none",compression="`+compress+`",deltas="`+strconv.FormatBool(deltas)+`"\s+1$`, out)
	assert.Regexp(t, `(?m)^wire bytes per dirty page\s+[0-9.]+ (B|KiB)$`, out)
	assert.Regexp(t, `(?m)^page bytes on the wire / raw\s+[0-9.e-]+×$`, out)
}

// statsJSON is ctl stats --json.
func statsJSON(t require.TestingT, sock string) ctlapi.Stats {
	helper(t)
	out, errOut, status := govmm(t, time.Minute, "ctl", "--api-sock", sock, "stats", "--json")
	require.Equal(t, 0, status, errOut)
	var st ctlapi.Stats
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	return st
}

// samples are st's unlabelled samples by name.
func samples(st ctlapi.Stats) map[string]float64 {
	v := map[string]float64{}
	for _, m := range st.Metrics {
		if len(m.Labels) == 0 {
			v[m.Name] = m.Value
		}
	}
	return v
}
