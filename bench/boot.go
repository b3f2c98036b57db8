package bench

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"govmm/guestimg"
	"govmm/internal/boottrace"
	"govmm/lab"
	"govmm/vmm"
)

// BootConfig parameterises the boot suite.
type BootConfig struct {
	Govmm  string // the govmm binary
	QEMU   string // qemu-system-x86_64; looked up in PATH when empty
	Guest  string // "tiny", "default" or "auto" (default unless KVM here is emulated)
	Kernel string // for Guest "default": the image (govmm image build)
	Initrd string
	// Vmlinux, when set (the default image's), adds govmm's tuned path:
	// this kernel entered through PVH, with vmm.DefaultCmdline (the
	// tuned one); QEMU on the very same vmlinux (PVH too), initrd and
	// command line; and QEMU on the bzImage with that command line.
	Vmlinux string
	// Baseline, if set, is another govmm binary (e.g. a build of main)
	// that boots the bzImage as "govmm" does, in every run, as
	// "baseline": a change measured side by side with what it changes.
	Baseline string
	MemMiB   int
	Runs     int
	Timeout  time.Duration
	Out      string // results directory (created)
	Log      io.Writer
}

// BootSample is one boot of one VMM.
type BootSample struct {
	VMM     string // govmm, baseline, govmm-bzimage, qemu, govmm-tuned, qemu-pvh or qemu-tuned
	Guest   string
	Run     int
	ReadyMs float64
	Mem     Memory
	// Phases is where the time went (boottrace), when the console told
	// (PhasesErr says why not).
	Phases    boottrace.Phases
	PhasesErr error
}

// bootGuest picks the boot suite's guest (auto: the default one where
// KVM boots Linux, else the tiny one) and returns its files; cleanup
// removes what it wrote.
func bootGuest(cfg BootConfig) (guest, kernel, initrd string, cleanup func(), err error) {
	guest, cleanup = cfg.Guest, func() {}
	if guest == "" || guest == "auto" {
		guest = "default"
		if reason := lab.Emulated(); reason != "" {
			fmt.Fprintf(cfg.Log, "boot: using the tiny guest: %s\n", reason)
			guest = "tiny"
		}
	}
	switch guest {
	case "tiny":
		dir, err := os.MkdirTemp("", "govmm-bench-")
		if err != nil {
			return "", "", "", nil, err
		}
		cleanup = func() { os.RemoveAll(dir) }
		kernel, initrd = filepath.Join(dir, "tiny.bzImage"), filepath.Join(dir, "tiny.initrd")
		if err := os.WriteFile(kernel, TinyKernel(false), 0o644); err != nil {
			cleanup()
			return "", "", "", nil, err
		}
		if err := os.WriteFile(initrd, make([]byte, 4096), 0o644); err != nil {
			cleanup()
			return "", "", "", nil, err
		}
		return guest, kernel, initrd, cleanup, nil
	case "default":
		if cfg.Kernel == "" || cfg.Initrd == "" {
			return "", "", "", nil, fmt.Errorf("boot: the default guest needs its kernel and initrd (govmm image build --print)")
		}
		return guest, cfg.Kernel, cfg.Initrd, cleanup, nil
	}
	return "", "", "", nil, fmt.Errorf("boot: unknown guest %q (tiny, default or auto)", guest)
}

// Boot measures wall time from process start to the guest's ready line,
// where that time went (internal/boottrace), and the VMM's own memory at
// that moment, for govmm and QEMU on the same kernel, initrd and command
// line, and for govmm's tuned path (BootConfig.Vmlinux), alternately. It
// also returns what the report should say about how the boots were
// prepared (the bzImage's PVH kernel put in govmm's cache).
func Boot(ctx context.Context, cfg BootConfig) ([]BootSample, string, error) {
	if cfg.Runs <= 0 {
		cfg.Runs = 5
	}
	if cfg.MemMiB <= 0 {
		cfg.MemMiB = 256
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	guest, kernel, initrd, cleanup, err := bootGuest(cfg)
	if err != nil {
		return nil, "", err
	}
	defer cleanup()
	var prep string
	if guest == "default" {
		if prep, err = preparePVHKernel(ctx, kernel); err != nil {
			return nil, "", err
		}
		fmt.Fprintf(cfg.Log, "boot: %s\n", prep)
	}
	qemu := cfg.QEMU
	if qemu == "" {
		if p, err := exec.LookPath("qemu-system-x86_64"); err == nil {
			qemu = p
		}
	}
	if qemu == "" {
		fmt.Fprintf(cfg.Log, "boot: qemu-system-x86_64 %v: measuring govmm alone (scripts/deps.sh bench installs it)\n", errNoPeer)
	}
	guestBytes := uint64(cfg.MemMiB) << 20
	peers := bootPeers(ctx, cfg, guest, kernel, initrd, qemu)
	var samples []BootSample
	for run := 1; run <= cfg.Runs; run++ {
		for i := range peers {
			p := peers[bootOrder(run, i, len(peers))]
			tr, err := bootTraceTrial(ctx, p.cmd(), guestBytes, cfg.Timeout)
			if err != nil {
				return samples, prep, fmt.Errorf("boot %s run %d: %w", p.name, run, err)
			}
			s := BootSample{VMM: p.name, Guest: guest, Run: run, ReadyMs: msOf(tr.ready), Mem: tr.mem, Phases: tr.phases, PhasesErr: tr.phasesErr}
			fmt.Fprintf(cfg.Log, "boot: %-11s run %d: ready in %8.1f ms, rss %6d KiB, guest %6d KiB\n",
				p.name, run, s.ReadyMs, s.Mem.RSSKiB, s.Mem.GuestRSSKiB)
			if s.PhasesErr == nil {
				fmt.Fprintf(cfg.Log, "boot: %-11s run %d: %s\n", p.name, run, s.Phases)
			}
			samples = append(samples, s)
		}
	}
	if cfg.Out != "" {
		if err := writeBootCSV(filepath.Join(cfg.Out, "boot.csv"), samples); err != nil {
			return samples, prep, err
		}
		if err := plotBootPhases(filepath.Join(cfg.Out, "boot_phases"), samples); err != nil {
			return samples, prep, err
		}
	}
	return samples, prep, nil
}

// preparePVHKernel puts the bzImage's uncompressed kernel in govmm's cache
// (guestimg.PVHKernel, where `govmm run --kernel BZIMAGE` finds it), so
// that the timed boots are what a user's second boot is, and says how
// long its making took, or that it was there.
func preparePVHKernel(ctx context.Context, kernel string) (string, error) {
	bz, err := os.ReadFile(kernel)
	if err != nil {
		return "", err
	}
	dir := guestimg.DefaultCacheDir()
	before, _ := filepath.Glob(filepath.Join(dir, "pvh", "*.vmlinux"))
	start := time.Now()
	had := false
	if p, err := guestimg.PVHKernel(ctx, dir, kernel, bz, vmm.CheckKernel); err == nil {
		had = slices.Contains(before, p)
	} else {
		return fmt.Sprintf("the bzImage has no PVH kernel, so the govmm peer boots it through its decompressor as govmm-bzimage does: %v", err), nil
	}
	if had {
		return "The bzImage's uncompressed kernel (what `govmm run --kernel BZIMAGE` enters through PVH, --kernel-entry auto) was in govmm's cache already.", nil
	}
	return fmt.Sprintf("Before the timed boots, the bzImage's uncompressed kernel (what `govmm run --kernel BZIMAGE` enters through PVH, --kernel-entry auto) "+
		"was extracted into govmm's cache, as a user's first boot of it does: %.1f s, once; the boots below find it there.", time.Since(start).Seconds()), nil
}

// bootOrder is which of n peers boots i-th in run (from 1): who goes
// first rotates, and every other run goes the other way round, so that no
// peer always boots right after the same one (a long QEMU boot left the
// lab's L1 slower for the next guest's kernel init: docs/BOOT.md).
func bootOrder(run, i, n int) int {
	if run%2 == 0 {
		return ((run-1-i)%n + n) % n
	}
	return (i + run - 1) % n
}

// bootPeer is one way of booting the guest that Boot measures: its name
// in the samples and how to start it.
type bootPeer struct {
	name string
	cmd  func() *exec.Cmd
}

// bootPeers lists what Boot measures: govmm, QEMU when there is one (qemu
// is its path, or empty), and with cfg.Vmlinux on the default guest their
// tuned pair.
//
// "govmm" boots the bzImage as `govmm run --kernel` does by default: its
// uncompressed kernel, from the cache, through PVH (Boot prepares it);
// "govmm-bzimage" (the default guest) runs the bzImage's decompressor in
// the guest, as QEMU must.
func bootPeers(ctx context.Context, cfg BootConfig, guest, kernel, initrd, qemu string) []bootPeer {
	mem := fmt.Sprintf("%dM", cfg.MemMiB)
	// The same guest for both: kernel, initrd, command line, memory, one
	// vCPU and no devices beyond the console (QEMU's -nodefaults; govmm
	// without a NIC, so that it adds nothing to the command line, and
	// without its control socket, as QEMU runs without QMP). "govmm" and
	// "qemu" boot the bzImage with vmm.BaseCmdline, what a user would
	// pass either. "govmm-tuned" and "qemu-pvh" boot the same vmlinux
	// through PVH (QEMU's -kernel takes an ELF kernel with a PVH note
	// since 4.0: SeaBIOS runs, then its PVH option ROM enters the kernel)
	// with vmm.DefaultCmdline; "qemu-tuned" boots the bzImage with that
	// command line.
	govmmBinCmd := func(bin, kernel, cmdline, entry string) func() *exec.Cmd {
		return func() *exec.Cmd {
			return exec.CommandContext(ctx, bin, "run", "--boot-trace", "--kernel", kernel, "--kernel-entry", entry, "--initrd", initrd, "--mem", mem, "--cpus", "1",
				"--net", "none", "--api-sock", "", "--cmdline-base", cmdline)
		}
	}
	govmmCmd := func(kernel, cmdline, entry string) func() *exec.Cmd {
		return govmmBinCmd(cfg.Govmm, kernel, cmdline, entry)
	}
	qemuCmd := func(kernel, cmdline string) func() *exec.Cmd {
		return func() *exec.Cmd {
			return exec.CommandContext(ctx, qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "pc,acpi=off", "-m", strconv.Itoa(cfg.MemMiB),
				"-smp", "1", "-display", "none", "-nodefaults", "-no-user-config", "-serial", "stdio", "-monitor", "none",
				"-no-reboot", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
				"-device", "isa-debug-exit,iobase=0x600,iosize=1")
		}
	}
	peers := []bootPeer{{"govmm", govmmCmd(kernel, vmm.BaseCmdline, "auto")}}
	if cfg.Baseline != "" {
		peers = append(peers, bootPeer{"baseline", govmmBinCmd(cfg.Baseline, kernel, vmm.BaseCmdline, "auto")})
	}
	if guest == "default" {
		peers = append(peers, bootPeer{"govmm-bzimage", govmmCmd(kernel, vmm.BaseCmdline, "bzimage")})
	}
	if qemu != "" {
		peers = append(peers, bootPeer{"qemu", qemuCmd(kernel, vmm.BaseCmdline)})
	}
	if cfg.Vmlinux != "" && guest == "default" {
		peers = append(peers, bootPeer{"govmm-tuned", govmmCmd(cfg.Vmlinux, vmm.DefaultCmdline, "auto")})
		if qemu != "" {
			peers = append(peers, bootPeer{"qemu-pvh", qemuCmd(cfg.Vmlinux, vmm.DefaultCmdline)},
				bootPeer{"qemu-tuned", qemuCmd(kernel, vmm.DefaultCmdline)})
		}
	}
	return peers
}

func writeBootCSV(path string, samples []BootSample) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	rows := [][]string{}
	for _, s := range samples {
		row := []string{"boot", s.VMM, s.Guest, strconv.Itoa(s.Run), strconv.FormatFloat(s.ReadyMs, 'f', 3, 64),
			strconv.FormatUint(s.Mem.RSSKiB, 10), strconv.FormatUint(s.Mem.GuestRSSKiB, 10), strconv.FormatUint(s.Mem.OverheadKiB(), 10)}
		if s.PhasesErr == nil {
			p := s.Phases
			setup := ""
			if p.SetupKnown {
				setup = ftoa(msOf(p.VMMSetup), 3)
			}
			row = append(row, setup, ftoa(msOf(p.Decompress), 3), ftoa(msOf(p.KernelInit), 3), ftoa(msOf(p.Unpack), 3), ftoa(msOf(p.InitToReady), 3))
		} else {
			row = append(row, "", "", "", "", "")
		}
		rows = append(rows, row)
	}
	return writeCSV(path, []string{"suite", "vmm", "guest", "run", "ready_ms", "rss_kib", "guest_rss_kib", "overhead_kib",
		"vmm_setup_ms", "decompress_ms", "kernel_init_ms", "unpack_ms", "init_to_ready_ms"}, rows)
}

// BootReport renders the boot samples as a Markdown table with medians,
// spread and the QEMU/govmm ratio.
func BootReport(samples []BootSample) string {
	by := map[string][]BootSample{}
	for _, s := range samples {
		by[s.VMM] = append(by[s.VMM], s)
	}
	out := "| VMM | guest | runs | ready median (ms) | p25–p75 (ms) | min–max (ms) | RSS median (MiB) | VMM overhead median (MiB) |\n|---|---|---|---|---|---|---|---|\n"
	med := map[string]Summary{}
	for _, name := range []string{"govmm", "baseline", "govmm-bzimage", "qemu", "govmm-tuned", "qemu-pvh", "qemu-tuned"} {
		ss := by[name]
		if len(ss) == 0 {
			continue
		}
		var ready, rss, over []float64
		for _, s := range ss {
			ready = append(ready, s.ReadyMs)
			rss = append(rss, float64(s.Mem.RSSKiB)/1024)
			over = append(over, float64(s.Mem.OverheadKiB())/1024)
		}
		r := Summarize(ready)
		med[name] = r
		out += fmt.Sprintf("| %s | %s | %d | %.1f | %.1f–%.1f | %.1f–%.1f | %.1f | %.1f |\n",
			name, ss[0].Guest, r.N, r.Median, r.P25, r.P75, r.Min, r.Max, Summarize(rss).Median, Summarize(over).Median)
	}
	ratio := func(a, b string) (float64, bool) {
		g, q := med[a], med[b]
		return g.Median / q.Median, g.N > 0 && q.N > 0 && q.Median > 0
	}
	if r, ok := ratio("govmm-tuned", "qemu-pvh"); ok {
		out += fmt.Sprintf("\nSame inputs, the default ones (the vmlinux through PVH, the initrd, `vmm.DefaultCmdline`): govmm takes %.2f× QEMU's median time to the ready line (goal ≤ 0.5×).%s\n",
			r, pairedRatios(by["govmm-tuned"], by["qemu-pvh"]))
	}
	if r, ok := ratio("govmm", "qemu"); ok {
		out += fmt.Sprintf("\nSame inputs, a user's plain ones (the bzImage, the initrd, `vmm.BaseCmdline`), each VMM booting the bzImage its own way (govmm: its uncompressed kernel through PVH, --kernel-entry auto, the default): govmm takes %.2f× QEMU's median (goal ≤ 0.5×).%s\n",
			r, pairedRatios(by["govmm"], by["qemu"]))
	}
	if r, ok := ratio("govmm", "baseline"); ok {
		out += fmt.Sprintf("\nThis govmm against the baseline binary on the same inputs (*baseline*, another govmm build booting the bzImage the same way in the same runs): %.2f× its median.%s\n",
			r, pairedRatios(by["govmm"], by["baseline"]))
		if r, ok := ratio("baseline", "qemu"); ok {
			out += fmt.Sprintf("The baseline against QEMU: %.2f×.\n", r)
		}
	}
	if r, ok := ratio("govmm-bzimage", "qemu"); ok {
		out += fmt.Sprintf("\nThe same, govmm running the bzImage's decompressor in the guest as QEMU does (--kernel-entry bzimage): %.2f× QEMU's median.%s\n",
			r, pairedRatios(by["govmm-bzimage"], by["qemu"]))
	}
	if r, ok := ratio("govmm-tuned", "qemu"); ok {
		out += fmt.Sprintf("\ngovmm's tuned path (vmlinux through PVH, `%s`) against QEMU's defaults (bzImage, plain command line): %.2f× (goal ≤ 0.3×).%s\n",
			vmm.TunedCmdline, r, pairedRatios(by["govmm-tuned"], by["qemu"]))
	}
	if r, ok := ratio("govmm-tuned", "qemu-tuned"); ok {
		out += fmt.Sprintf("\nQEMU on the bzImage with the tuned command line: govmm's tuned path takes %.2f× its median.\n", r)
	}
	out += bootPhasesTable(samples)
	return out
}

// pairedRatios says, for two VMMs measured in the same runs, the median
// and range of a's time over b's run by run: each run boots every peer in
// turn, so a pair shares the host's load of the moment, which on a busy
// lab host moves both by more than the difference between them. Empty
// with fewer than two such runs.
func pairedRatios(a, b []BootSample) string {
	byRun := map[int]float64{}
	for _, s := range b {
		byRun[s.Run] = s.ReadyMs
	}
	var rs []float64
	for _, s := range a {
		if q, ok := byRun[s.Run]; ok && q > 0 {
			rs = append(rs, s.ReadyMs/q)
		}
	}
	if len(rs) < 2 {
		return ""
	}
	r := Summarize(rs)
	return fmt.Sprintf(" Run by run (the two side by side in each run): median %.2f×, %.2f–%.2f× over %d runs.", r.Median, r.Min, r.Max, r.N)
}
