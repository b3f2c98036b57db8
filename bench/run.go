package bench

import (
	"context"
	"fmt"
	"io"
	"time"

	"govmm/lab"
	"govmm/replicate/stream"
)

// Options are the parameters of a `govmm bench` run.
type Options struct {
	Quick bool   // tiny parameters: the suites work, the numbers mean little
	Runs  int    // trials per point (0: each suite's default)
	Out   string // results directory
	Govmm string // the govmm binary (boot and failover run it)
	Log   io.Writer
	Boot  BootConfig // Govmm, Guest, Kernel, Initrd, MemMiB; the rest is filled in
	// Modes are the failures failover-guest times (FailKill, FailStop;
	// default both).
	Modes []string
	// Witness are failover-guest's witness settings (false: without, true:
	// with; default both).
	Witness []bool
	// StreamModes and Workloads are wire-guest's (default: all of each).
	StreamModes []StreamMode
	Workloads   []string
	Window      time.Duration // wire-guest's window (0: its default)
	// Baseline is wire-guest's and migration-guest's other govmm binary,
	// replicated or migrated beside this one ("": none; boot's is
	// Boot.Baseline).
	Baseline string
	// Split is ack's split mode (AckConfig.Split).
	Split bool
	// SendBuffers are ack's send buffer policies (AckConfig.SendBuffers;
	// default the stream's, SendBufferAuto).
	SendBuffers []int
}

// Emulated says whether KVM here emulates guests (see lab.Emulated).
func Emulated() bool { return lab.Emulated() != "" }

// Run runs the named suites in order into o.Out and returns each one's
// section of report.md. On error, the sections of the suites that
// finished are returned with it.
func Run(ctx context.Context, o Options, suites []string) (map[string]string, error) {
	if o.Log == nil {
		o.Log = io.Discard
	}
	sections := map[string]string{}
	for _, s := range suites {
		start := time.Now()
		fmt.Fprintf(o.Log, "bench: %s\n", s)
		section, err := o.suite(ctx, s)
		if err != nil {
			return sections, err
		}
		sections[s] = section
		fmt.Fprintf(o.Log, "bench: %s done in %v\n", s, time.Since(start).Round(time.Millisecond))
	}
	return sections, nil
}

// runs is the number of trials: o.Runs if set, else quick's or full's.
func (o Options) runs(full, quick int) int {
	switch {
	case o.Runs > 0:
		return o.Runs
	case o.Quick:
		return quick
	}
	return full
}

// suite runs one suite and returns its section of report.md. It is one
// case per suite, each its configuration (full and quick) and its call:
// the table of suites, read best in one place (those that boot the
// default guest in guestSuite).
func (o Options) suite(ctx context.Context, s string) (string, error) {
	switch s {
	case "boot":
		cfg := o.Boot
		cfg.Runs, cfg.Out, cfg.Log = o.runs(11, 3), o.Out, o.Log
		if cfg.Govmm == "" {
			cfg.Govmm = o.Govmm
		}
		samples, prep, err := Boot(ctx, cfg)
		if err != nil {
			return "", err
		}
		if prep != "" {
			prep += "\n\n"
		}
		return platform() + "\n\nGuest: *tiny* is `bench.TinyKernel`, a bzImage that prints the ready line at once and halts " +
			"(govmm enters it at its 64-bit entry, QEMU through its firmware and the real-mode entry); *default* is the default guest image. " +
			"Raw data `boot.csv`.\n\n" + prep + BootReport(samples), nil
	case "checkpoint":
		cfg := CheckpointConfig{Epochs: 40, Out: o.Out, Log: o.Log}
		if o.Quick {
			// Every copy mode at the sizes where they part (auto stops
			// to copy at 100 to 4k pages and copies on write at 64k),
			// over sparse pages only.
			cfg.Pages, cfg.Epochs, cfg.Warmup, cfg.BoundReps = []int{100, 1000, 4096, 65536}, 10, 3, 3
			cfg.HarvestPages = []int{100, 1000}
			cfg.Contents = []string{ContentSparse}
			cfg.Modes = []StreamMode{{Compression: stream.CompressNone}, {Compression: stream.CompressS2, Deltas: true}}
			if lab.InLab() {
				// Emulated, 64k pages a mode take minutes: 16k still
				// has auto copy on write.
				cfg.Pages, cfg.Epochs, cfg.Warmup, cfg.BoundReps = []int{100, 4096, 16384}, 5, 2, 2
			}
		}
		return report(Checkpoint(ctx, cfg))
	case "ack":
		cfg := AckConfig{Rounds: o.runs(10, 3), Split: o.Split, SendBuffers: o.SendBuffers, Govmm: o.Govmm, Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Pages, cfg.Batch, cfg.Gaps = []int{100, 1000}, 50*time.Millisecond, []time.Duration{0, 10 * time.Millisecond}
		}
		return report(Ack(ctx, cfg))
	case "migration":
		cfg := MigrationConfig{Trials: o.runs(5, 2), Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Pages = []int{0, 256}
		}
		return report(Migration(ctx, cfg))
	case "failover":
		cfg := FailoverConfig{Govmm: o.Govmm, Trials: o.runs(10, 3), Witness: true, Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Timeouts = []time.Duration{500 * time.Millisecond}
			if lab.InLab() {
				// The emulated stream's pre-copy rounds can go quiet
				// for more than 500 ms: then the primary gives up.
				cfg.Timeouts = []time.Duration{2 * time.Second}
			}
		}
		return report(Failover(ctx, cfg))
	case "fencing":
		cfg := FencingConfig{Trials: o.runs(3, 1), Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Epochs, cfg.Warmup = 40, 5
		}
		return report(Fencing(ctx, cfg))
	case "overhead":
		cfg := OverheadConfig{Trials: o.runs(3, 2), Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Pages = []int{256}
			cfg.Epochs = []time.Duration{25 * time.Millisecond, 100 * time.Millisecond}
			cfg.Warmup, cfg.Window = 200*time.Millisecond, 500*time.Millisecond
		}
		return report(Overhead(ctx, cfg))
	default:
		return o.guestSuite(ctx, s)
	}
}

// guestSuite runs one of the suites that boot the default guest (in the
// lab where the host cannot) and returns its section of report.md.
func (o Options) guestSuite(ctx context.Context, s string) (string, error) {
	switch s {
	case "failover-guest":
		cfg := FailoverGuestConfig{Govmm: o.Govmm, Kernel: o.Boot.Kernel, Initrd: o.Boot.Initrd, Trials: o.runs(3, 1), Modes: o.Modes, Witness: o.Witness, Out: o.Out, Log: o.Log}
		return report(FailoverGuest(ctx, cfg))
	case "overhead-guest":
		cfg := OverheadGuestConfig{Govmm: o.Govmm, Kernel: o.Boot.Kernel, Initrd: o.Boot.Initrd, Trials: o.runs(3, 1), Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Epochs = []time.Duration{25 * time.Millisecond}
			cfg.Warmup, cfg.Window = time.Second, 3*time.Second
		}
		return report(OverheadGuest(ctx, cfg))
	case "wire-guest":
		cfg := WireGuestConfig{Govmm: o.Govmm, Baseline: o.Baseline, Kernel: o.Boot.Kernel, Initrd: o.Boot.Initrd, Modes: o.StreamModes, Workloads: o.Workloads,
			Trials: o.runs(1, 1), Out: o.Out, Log: o.Log}
		if o.Quick {
			cfg.Warmup, cfg.Window = 2*time.Second, 5*time.Second
		}
		if o.Window > 0 {
			cfg.Window = o.Window
		}
		return report(WireGuest(ctx, cfg))
	case "migration-guest":
		cfg := MigrationGuestConfig{Govmm: o.Govmm, Baseline: o.Baseline, Kernel: o.Boot.Kernel, Initrd: o.Boot.Initrd, Trials: o.runs(3, 1), Out: o.Out, Log: o.Log}
		return report(MigrationGuest(ctx, cfg))
	default:
		return "", fmt.Errorf("unknown suite %q", s)
	}
}

// report is a suite's section of report.md, or its error.
func report[R interface{ Report() string }](r R, err error) (string, error) {
	if err != nil {
		return "", err
	}
	return r.Report(), nil
}
