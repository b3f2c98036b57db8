package bench

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The source's Debug line (replicate.Migrate's, as GOVMM_LOG=debug
// prints it) is where a govmm sample's numbers come from.
func TestMigrationGuestParsesTheSourcesBreakdown(t *testing.T) {
	log := "govmm: listening\ngovmm: debug: migration sent component=replicate peer=127.0.0.1:7000 total=3.45434474s connect=100.35341ms " +
		"setup=15.85588ms precopy=3.19345336s ack_wait=108.69483ms downtime=35.75658ms rounds=2 wire_bytes=117682130 pages=65613 " +
		"zero_pages=37143 seal=8.48217ms write=2.25997013s\n"
	var s MigrationGuestSample
	require.NoError(t, s.parseGovmm(log))
	assert.Equal(t, 3454344740*time.Nanosecond, s.Total)
	assert.Equal(t, 35756580*time.Nanosecond, s.Downtime)
	assert.Equal(t, 100353410*time.Nanosecond, s.Connect)
	assert.Equal(t, 3193453360*time.Nanosecond, s.PreCopy)
	assert.Equal(t, 108694830*time.Nanosecond, s.AckWait)
	assert.Equal(t, uint64(117682130), s.BytesSent)
	assert.Equal(t, 2, s.Rounds)

	require.Error(t, new(MigrationGuestSample).parseGovmm("govmm: no breakdown here\n"))
}

func TestMigrationGuestReport(t *testing.T) {
	r := &MigrationGuestResult{Config: MigrationGuestConfig{MemMiB: 256, Trials: 2, Settle: time.Second, Baseline: "bin/govmm-main"}}
	for i, ms := range []int{1000, 3000} {
		r.Samples = append(r.Samples,
			MigrationGuestSample{VMM: "govmm", Trial: i + 1, Total: time.Duration(ms) * time.Millisecond, BytesSent: 1 << 20, Rounds: 2},
			MigrationGuestSample{VMM: "baseline", Trial: i + 1, Total: time.Duration(3*ms) * time.Millisecond, BytesSent: 1 << 20, Rounds: 2},
			MigrationGuestSample{VMM: "qemu", Trial: i + 1, Total: time.Duration(2*ms) * time.Millisecond, BytesSent: 1 << 20})
	}
	r.Failed = []string{"qemu trial 3: boom"}
	rep := r.Report()
	assert.Contains(t, rep, "| govmm | 2 | 2000 (1000–3000) |")
	assert.Contains(t, rep, "govmm / QEMU, total time (medians): **0.50×**; baseline / QEMU: 1.50×")
	assert.Contains(t, rep, "`bin/govmm-main`")
	assert.Contains(t, rep, "| baseline | 2 | 9000 |")
	assert.Contains(t, rep, "- qemu trial 3: boom")
}
