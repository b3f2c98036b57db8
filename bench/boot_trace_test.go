package bench

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/boottrace"
)

// The breakdown's medians, table, CSV and stacked bars come from the
// samples that have one; a sample without (the tiny guest) is left out.
func TestBootPhasesOutput(t *testing.T) {
	ph := func(setup, dec, kin, unp, rdy int) boottrace.Phases {
		ms := func(v int) time.Duration { return time.Duration(v) * time.Millisecond }
		return boottrace.Phases{VMMSetup: ms(setup), SetupKnown: setup > 0, Decompress: ms(dec), KernelInit: ms(kin), Unpack: ms(unp), InitToReady: ms(rdy)}
	}
	samples := []BootSample{
		{VMM: "govmm", Phases: ph(10, 100, 1000, 50, 500)},
		{VMM: "govmm", Phases: ph(30, 300, 3000, 70, 700)},
		{VMM: "govmm", Phases: ph(20, 200, 2000, 60, 600)},
		{VMM: "qemu", Phases: ph(0, 900, 2000, 60, 600)},
		{VMM: "qemu", PhasesErr: errors.New("no guest time")},
	}
	names, med := medianPhases(samples)
	assert.Equal(t, []string{"govmm", "qemu"}, names)
	assert.Equal(t, [][]float64{{20, 200, 2000, 60, 600}, {0, 900, 2000, 60, 600}}, med)
	assert.Contains(t, bootPhasesTable(samples), "| govmm | 20.0 | 200.0 | 2000.0 | 60.0 | 600.0 |")

	path := filepath.Join(t.TempDir(), "boot_phases")
	require.NoError(t, plotBootPhases(path, samples))
	for _, ext := range []string{".csv", ".png", ".svg"} {
		st, err := os.Stat(path + ext)
		require.NoError(t, err, ext)
		assert.Positive(t, st.Size(), ext)
	}
	csv, err := os.ReadFile(path + ".csv")
	require.NoError(t, err)
	assert.Equal(t, "vmm,vmm_setup_ms,decompress_ms,kernel_init_ms,unpack_ms,init_to_ready_ms\n"+
		"govmm,20.000,200.000,2000.000,60.000,600.000\nqemu,0.000,900.000,2000.000,60.000,600.000\n", strings.ReplaceAll(string(csv), "\r", ""))

	// Without any breakdown nothing is drawn.
	empty := filepath.Join(t.TempDir(), "none")
	require.NoError(t, plotBootPhases(empty, samples[4:]))
	_, err = os.Stat(empty + ".png")
	assert.True(t, os.IsNotExist(err))
}

// The report's ratios pair the right VMMs: the same vmlinux, initrd and
// tuned command line (govmm-tuned against qemu-pvh), the same plain
// inputs (govmm against qemu, and govmm running the bzImage's
// decompressor against qemu), and the tuned path against QEMU's defaults.
func TestBootReportRatios(t *testing.T) {
	var samples []BootSample
	for name, ms := range map[string]float64{"govmm": 6000, "govmm-bzimage": 8000, "qemu": 10000, "govmm-tuned": 2000, "qemu-pvh": 4000, "qemu-tuned": 5000} {
		samples = append(samples, BootSample{VMM: name, Guest: "default", ReadyMs: ms, PhasesErr: errors.New("none")})
	}
	r := BootReport(samples)
	assert.Contains(t, r, "Same inputs, the default ones (the vmlinux through PVH, the initrd, `vmm.DefaultCmdline`): govmm takes 0.50× QEMU's median")
	assert.Contains(t, r, "Same inputs, a user's plain ones (the bzImage, the initrd, `vmm.BaseCmdline`), each VMM booting the bzImage its own way (govmm: its uncompressed kernel through PVH, --kernel-entry auto, the default): govmm takes 0.60× QEMU's median")
	assert.Contains(t, r, "govmm running the bzImage's decompressor in the guest as QEMU does (--kernel-entry bzimage): 0.80× QEMU's median")
	assert.Contains(t, r, "against QEMU's defaults (bzImage, plain command line): 0.20×")
	assert.Contains(t, r, "govmm's tuned path takes 0.40× its median")
	for _, name := range []string{"govmm", "govmm-bzimage", "qemu", "govmm-tuned", "qemu-pvh", "qemu-tuned"} {
		assert.Contains(t, r, "| "+name+" | default | 1 |")
	}
	assert.NotContains(t, r, "Run by run", "one run: no paired ratio")

	// Without QEMU there is no ratio.
	var alone []BootSample
	for _, s := range samples {
		if strings.HasPrefix(s.VMM, "govmm") {
			alone = append(alone, s)
		}
	}
	require.Len(t, alone, 3)
	assert.NotContains(t, BootReport(alone), "×")

	// Two more runs: the run-by-run ratios pair each run's own boots.
	for run, ms := range map[int][2]float64{2: {3000, 2500}, 3: {2500, 5000}} {
		samples = append(samples, BootSample{VMM: "govmm-tuned", Guest: "default", Run: run, ReadyMs: ms[0], PhasesErr: errors.New("none")},
			BootSample{VMM: "qemu-pvh", Guest: "default", Run: run, ReadyMs: ms[1], PhasesErr: errors.New("none")})
	}
	r = BootReport(samples)
	assert.Contains(t, r, "govmm takes 0.62× QEMU's median time to the ready line (goal ≤ 0.5×). Run by run (the two side by side in each run): median 0.50×, 0.50–1.20× over 3 runs.",
		"medians 2500/4000; runs 0.50, 1.20, 0.50")
}

// A VMM that exits before its ready line fails the trial with its last
// words on stderr, all of them read (the reader races the exit), and a
// VMM setup report on stderr is not taken for them.
func TestBootTrialEarlyExitSaysWhy(t *testing.T) {
	for range 20 {
		cmd := exec.Command("sh", "-c", "echo starting >&2; printf 'x%.0s' $(seq 100) >&2; echo >&2; echo 'no /dev/kvm here' >&2; exit 3")
		_, err := bootTraceTrial(t.Context(), cmd, 0, 30*time.Second)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "exited before the ready line: no /dev/kvm here")
	}
}

// A VMM whose guest stalls fails the trial with the console's last lines
// and when each came, so a report says where the boot stopped.
func TestBootTrialStallSaysWhere(t *testing.T) {
	cmd := exec.Command("sh", "-c", "for i in $(seq 12); do echo \"[    0.$i] line $i\"; done; sleep 30")
	_, err := bootTraceTrial(t.Context(), cmd, 0, 2*time.Second)
	require.Error(t, err)
	msg := err.Error()
	assert.Contains(t, msg, "no ready line within 2s")
	assert.Contains(t, msg, "line 12")
	assert.Contains(t, msg, "line 5")
	assert.NotContains(t, msg, "line 4\n", "only the last eight")
	assert.Regexp(t, `\n +[0-9]+\.[0-9] s  \[    0\.12\] line 12$`, msg)
}
