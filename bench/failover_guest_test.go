package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Runs written by the suite merge into one result: every trial, renumbered
// per mode and witness setting, the failed ones listed with their run,
// and the report and plot written.
func TestMergeFailoverGuest(t *testing.T) {
	dir := t.TempDir()
	run := func(name string, timeout time.Duration, failed []string, answers ...time.Duration) string {
		r := &FailoverGuestResult{Failed: failed, Platform: "**Lab numbers**: test"}
		for i, a := range answers {
			r.Samples = append(r.Samples, FailoverSample{Mode: FailKill, Witness: i%2 == 1, Trial: 1, Timeout: timeout,
				Answer: a, Takeover: a / 2, Claim: a / 4, Running: a * 3 / 4, Epoch: uint64(100 + i), Cause: "connection lost"})
		}
		d := filepath.Join(dir, name)
		require.NoError(t, os.MkdirAll(d, 0o755))
		require.NoError(t, r.write(d))
		return d
	}
	a := run("a", 3*time.Second, nil, 900*time.Millisecond, 1500*time.Millisecond)
	b := run("b", 3*time.Second, []string{"kill witness false trial 1: primary: exited"}, 1100*time.Millisecond, 1700*time.Millisecond)

	empty := filepath.Join(dir, "empty")
	require.NoError(t, os.MkdirAll(empty, 0o755))
	out := filepath.Join(dir, "merged")
	r, err := MergeFailoverGuest([]string{a, b, empty}, out)
	require.NoError(t, err)
	require.Len(t, r.Samples, 4)
	require.Equal(t, 3*time.Second, r.Config.Timeout)
	var trials []int
	for _, s := range r.Samples {
		trials = append(trials, s.Trial)
	}
	require.Equal(t, []int{1, 1, 2, 2}, trials, "renumbered per mode and witness")
	require.Equal(t, 1100*time.Millisecond, r.Samples[2].Answer)
	require.Equal(t, uint64(101), r.Samples[1].Epoch)
	require.Equal(t, []string{"b: kill witness false trial 1: primary: exited", "empty: no results: the run ended before it wrote any"}, r.Failed)
	rep := r.Report()
	require.Contains(t, rep, "Merged from 3 runs")
	require.Contains(t, rep, "**Lab numbers**: test", "where the runs ran, not where they were merged")
	require.Contains(t, rep, "| sigkill | no | 2 | 1000 | 900 | 1100 | 750 | 250 |", "the medians of 900 and 1100 ms, running 3/4 of them")
	require.Equal(t, 825*time.Millisecond, r.Samples[2].Running, "running read back")
	for _, f := range []string{failoverGuestCSV, failoverGuestFailed, "failover_guest.png"} {
		require.FileExists(t, filepath.Join(out, f))
	}

	c := run("c", 5*time.Second, nil, time.Second)
	_, err = MergeFailoverGuest([]string{a, c}, filepath.Join(dir, "bad"))
	require.ErrorContains(t, err, "failover timeout")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "c", failoverGuestCSV), []byte("mode,witness\nkill,true\n"), 0o644))
	_, err = MergeFailoverGuest([]string{c}, filepath.Join(dir, "bad2"))
	require.Error(t, err)
	require.True(t, strings.Contains(err.Error(), "not a failover-guest CSV"), err.Error())
}
