package main

import (
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"govmm/bench"
	"govmm/lab"
	"govmm/replicate/stream"
)

const benchUsage = `Usage: govmm bench [flags] [SUITE...]

Runs benchmarks and writes raw CSV (one row per sample), plots (PNG and SVG) and
report.md into --out (default bench/results/<timestamp>). Suites (default:
all of them, in this order):

boot: wall time from process start to the guest's ready line, and the
VMM's own memory (RSS minus guest RAM touched), beside QEMU when installed.
--guest auto boots the default guest where KVM runs guests at hardware
speed, and a tiny guest (a bzImage that prints the ready line at once)
where it emulates them. With the default guest it boots five ways, in
turn: govmm and QEMU on the bzImage with the plain command line, govmm
and QEMU on the same vmlinux through PVH with the tuned one
(vmm.DefaultCmdline), and QEMU on the bzImage with the tuned one;
--baseline boots another govmm binary (e.g. main's) as govmm boots the
bzImage, in every run, for a change measured side by side.

checkpoint: replication of a tiny dirtying guest to an in-process standby
over loopback: each epoch's pause broken into steps (harvest, copy, state,
resume) and its time to ack, against dirty pages per epoch (working sets
of 100, 1k, 4k, 16k and 64k pages; --quick: 100, 1k, 4k and 64k, sparse
pages only, a few minutes; epochs of 50ms,
or twice the guest's pass over its working set where it cannot write it
whole in 50ms), beside the
memcpy and loopback-bandwidth lower bounds measured in the same run; per
checkpoint copy mode (--checkpoint-copy stop, cow, and auto, which
chooses per checkpoint by its dirty set: the report sets their pause,
ack and pause + ack side by side and counts auto's choices),
each working set over sparse and over binary pages, with --stream-compress
none, s2 and zstd and s2 with --stream-deltas side by side (wire bytes per
dirty page, time to ack), the page codec's own speed on one core at the
largest working set, and the dirty-log harvest alone with
--dirty-tracking bitmap against ring at each working set.

ack: the stream alone (replicate/stream's BenchmarkAck as interleaved
rounds): time to ack and CPU per ack (both ends, this process's user and
system time) of checkpoints of 1,000, 4,096 and 65,536 distinct non-zero
pages (--quick: 100 and 1,000) over loopback TCP, keyed and unkeyed, back
to back and with a 50ms gap after each ack (an epoch; --quick: 10ms), each
batch beside the loopback bound of the same wire bytes, the tuned bound
(the same with a 256 KiB socket send buffer instead of the kernel's
autotuned one: often faster, so the bound is not a floor), unkeyed the
held bound (the reader keeps all of a checkpoint's bytes until the ack,
as a standby must), the applied bound (the held bound, then each
transfer copied into guest memory after its ack while the next is read,
as a standby applies a checkpoint) and, keyed, the sealed bound (those
bytes sealed and opened with the point's cipher, in 1 MiB chunks, one
at a time) and the sealed applied bound (the same, each chunk opened
into a held buffer, then copied into guest memory as the applied
bound does); keyed points run under each cipher the CPU runs
(AEGIS-128X2, AEGIS-128L, AES-256-GCM), a mode each, the modes taking
turns within each round; --runs rounds (default 10; --quick: 3). With --split, the standby's end (and the bound's reader) runs in a process of its own pinned to one CPU and the
sender's end is pinned to another, as on two one-core hosts. The stream
fixes its send buffer at 256 KiB on a link as short as loopback (its
default, auto); --send-buffers auto,kernel runs every mode under both,
side by side.

migration: live migration over loopback, total time and downtime against
the guest's measured dirty rate (working sets of 0, 256, 4096 and 16384
pages; --quick: 0 and 256).

failover: separate 'govmm run --replicate-to' and 'govmm standby'
processes; the primary is SIGKILLed (connection closed) or SIGSTOPped
(silent), and the time to the standby's first control-API answer that
the guest runs there is measured for failover timeouts of 200ms, 500ms
and 1s (--quick: 500ms), without a witness and with one (--witness,
lease = the failover timeout).

failover-guest (not run by default; where Linux boots, e.g. 'govmm lab --
bin/govmm bench failover-guest'): the failover suite's question with the
default guest and its demo service on user-mode networking: SIGKILL or
SIGSTOP of the primary to the first answer of GET /healthz from the
standby, without and with a witness (each trial boots the guest). In
the lab, whose L1 may die before a long run ends, run a few short runs
(--runs 1 --out DIR, each in its own L1) and merge them into one report
with 'govmm bench --merge DIR --merge DIR ... failover-guest'.

overhead-guest (not run by default; where Linux boots, e.g. 'govmm lab --
bin/govmm bench overhead-guest'): what replication costs the clients of
the default guest's demo service: answers per second and latency of POST
/incr on 4 keep-alive connections over 20s (--quick: 3s), unreplicated and
replicated to a standby at epochs of 10, 25, 50 and 100ms (--quick: 25ms);
each configuration boots the guest.

wire-guest (not run by default; where Linux boots, e.g. 'govmm lab --
bin/govmm bench wire-guest'): the stream's bytes on the wire per dirty
page on real-guest workloads: the default guest replicated to a standby
over loopback, booted once per stream mode (--stream-modes, default
none,s2,s2+deltas,zstd+deltas), runs each workload (--workloads, default
demo,untar,compress,disk: the demo service under client load, untar of
the guest's root file system into tmpfs, sort and gzip as a build's
stand-in, the same untar onto the guest's disk and synced)
for 3s of warmup and a 10s window (--window; --quick: 2s and 5s), the primary's
counters (--metrics-listen) read as the window opens and closes; wire
bytes per dirty page and × raw (4096+16 bytes) per workload and mode,
and the disk writes' bytes on the wire against their bytes. --baseline
replicates guests with another govmm binary too, in every mode and
trial, and compares their bytes per dirty page.

migration-guest (not run by default; where Linux boots, e.g. 'govmm lab
-- bin/govmm bench migration-guest'): live migration of the idle default
guest (1 vCPU, 256 MiB) over loopback, govmm (govmm ctl migrate to a
govmm standby, no key) beside QEMU (QMP migrate to -incoming, bandwidth
cap lifted) when installed, 3 trials each (--runs; --quick: 1), taking
turns: total time, downtime, bytes, and govmm's breakdown; --baseline
migrates another govmm binary (e.g. main's) the same way beside them.

fencing: what the witness lease costs a primary: the checkpoint pause of
a tiny dirtying guest replicated to an in-process standby without a
witness, with one (lease 2s, and 100ms) and with one that stops
answering, side by side, and the renewal traffic on the wire.

overhead: the guest-visible cost of replication: a tiny dirtying guest's
throughput (passes/s over 3s; --quick: 0.5s) unreplicated, replicated to
the null standby (checkpoints taken, shipped nowhere) and to an in-process
standby over loopback, at epochs of 10, 25, 50 and 100ms (--quick: 25 and
100ms), for working sets of 256 and 4096 pages (--quick: 256).

Flags:
`

// benchSuites is every suite, in the order they run by default.
var benchSuites = []string{"boot", "checkpoint", "ack", "migration", "failover", "fencing", "overhead"}

// extraSuites run only when named: they boot the default guest.
var extraSuites = []string{"failover-guest", "overhead-guest", "wire-guest", "migration-guest"}

// benchFlags are the flags of govmm bench.
type benchFlags struct {
	fs                         *flag.FlagSet
	runs                       *int
	quick                      *bool
	out, guest, modes, witness *string
	streamModes, workloads     *string
	baseline                   *string
	split, ackStandbyEnd       *bool
	sendBuffers                *string
	window                     time.Duration
	mem                        string
	merge                      listFlag
}

func newBenchFlags() *benchFlags {
	fs := newFlagSet("bench", benchUsage)
	f := &benchFlags{fs: fs, mem: "256M"}
	f.runs = fs.Int("runs", 0, "trials per VMM (boot, default 11), per working set (migration, default 5) or per timeout and mode (failover, default 10), per configuration (overhead, overhead-guest, default 3), boots per stream mode (wire-guest, default 1); epochs kept per working set (checkpoint) are 40")
	f.quick = fs.Bool("quick", false, "tiny parameters: proves the suites work in a few minutes, numbers mean little")
	f.out = fs.String("out", "", "results directory (default bench/results/<timestamp>)")
	f.guest = fs.String("guest", "auto", "boot suite guest: auto, tiny or default")
	fs.Var(memFlag{&f.mem}, "mem", "boot suite guest memory, as run --mem takes it: 256M, 1G (a bare number is MiB)")
	f.modes = fs.String("modes", "sigkill,sigstop", "failover-guest only: the primary's failures to time, `sigkill`, sigstop or both (comma-separated)")
	f.baseline = fs.String("baseline", "", "boot, wire-guest and migration-guest: another govmm `binary` (e.g. a build of main) booted (the bzImage, plain command line), replicated or migrated beside this one in every run")
	f.split = fs.Bool("split", false, "ack only: the standby's end in a process of its own on one CPU and the sender's on another, as a primary and a standby on two one-core hosts (needs two CPUs)")
	f.sendBuffers = fs.String("send-buffers", "auto", "ack only: the stream's send buffer `policies`, each mode run under each: auto (fixed at 256 KiB on a link whose round trip is under 100µs, else the kernel's), kernel (autotuned) or a size (256K) (comma-separated)")
	f.ackStandbyEnd = fs.Bool("ack-standby-end", false, "internal: the standby's end of ack --split (the suite starts it)")
	f.witness = fs.String("witness", "both", "failover-guest only: time each failure `without` a witness, with one, or both")
	f.streamModes = fs.String("stream-modes", "none,s2,s2+deltas,zstd+deltas", "wire-guest only: the stream `modes` to boot the guest in: none, s2 or zstd, each with or without +deltas (comma-separated)")
	f.workloads = fs.String("workloads", strings.Join(bench.WireGuestWorkloads, ","), "wire-guest only: the `workloads` to run in each guest (comma-separated)")
	durationVar(fs, &f.window, "window", 0, bench.CheckWireWindow, "wire-guest only: how long each workload's counters are read apart, a `duration` (default 10s; --quick: 5s)")
	fs.Var(&f.merge, "merge", "failover-guest only: merge the results `DIR` of an earlier run into one report instead of running trials (repeatable)")
	return f
}

func cmdBench(args []string) error {
	f := newBenchFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return err
	}
	suites := f.fs.Args()
	if *f.ackStandbyEnd {
		if len(args) != 1 {
			return usagef("bench", "--ack-standby-end takes nothing else: the ack suite starts it")
		}
		ctx, _, stop := benchSignals()
		defer stop()
		return bench.AckStandbyEnd(ctx, os.Stdin, os.Stdout)
	}
	if len(f.merge) > 0 {
		if err := refuseUnused(f.fs, "with --merge, which runs no trial", "runs", "quick", "guest", "mem", "modes", "witness", "stream-modes", "workloads", "window", "split"); err != nil {
			return err
		}
		return mergeBench(f.merge, suites, *f.out, args)
	}
	if len(suites) == 0 {
		suites = benchSuites
	}
	opts, err := f.options(suites)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(opts.Out, 0o755); err != nil {
		return err
	}
	// The stream's per-connection Info lines would drown the progress.
	slog.SetDefault(slog.New(newCLIHandler(os.Stderr, slog.LevelWarn)))
	ctx, caught, stop := benchSignals()
	defer stop()
	if err := f.guestImage(&opts, suites); err != nil {
		return err
	}
	command := strings.TrimSpace("govmm bench " + strings.Join(args, " "))
	if lab.InLab() {
		command = "govmm lab --share bench/results -- " + command
	}
	sections, err := bench.Run(ctx, opts, suites)
	if werr := bench.WriteReport(opts.Out, command, sections, suites); err == nil {
		err = werr
	}
	if sig := caught(); sig != 0 {
		return exitError{128 + int(sig)} // the finished suites are in the report
	}
	if err != nil {
		return err
	}
	for _, s := range suites {
		fmt.Printf("## %s\n\n%s\n", s, sections[s])
	}
	fmt.Printf("results: %s\n", opts.Out)
	return nil
}

// options checks the suites and the flags that only some suites use, and
// turns them into bench.Options (without the guest image: guestImage).
func (f *benchFlags) options(suites []string) (bench.Options, error) {
	for _, s := range suites {
		if !slices.Contains(benchSuites, s) && !slices.Contains(extraSuites, s) {
			return bench.Options{}, usagef("bench", "unknown suite %q (%s)", s, strings.Join(append(benchSuites, extraSuites...), ", "))
		}
	}
	if !slices.Contains(suites, "boot") {
		if err := refuseUnused(f.fs, "without the boot suite, the only one that uses it", "guest", "mem"); err != nil {
			return bench.Options{}, err
		}
	}
	if !slices.Contains(suites, "failover-guest") {
		if err := refuseUnused(f.fs, "without the failover-guest suite, the only one that uses it", "modes", "witness"); err != nil {
			return bench.Options{}, err
		}
	}
	if !slices.Contains(suites, "migration-guest") && !slices.Contains(suites, "boot") && !slices.Contains(suites, "wire-guest") {
		if err := refuseUnused(f.fs, "without the boot, wire-guest or migration-guest suite, the only ones that use it", "baseline"); err != nil {
			return bench.Options{}, err
		}
	}
	if !slices.Contains(suites, "ack") {
		if err := refuseUnused(f.fs, "without the ack suite, the only one that uses it", "split", "send-buffers"); err != nil {
			return bench.Options{}, err
		}
	}
	if !slices.Contains(suites, "wire-guest") {
		if err := refuseUnused(f.fs, "without the wire-guest suite, the only one that uses it", "stream-modes", "workloads", "window"); err != nil {
			return bench.Options{}, err
		}
	}
	streamModes, err := bench.ParseStreamModes(*f.streamModes)
	if err != nil {
		return bench.Options{}, usagef("bench", "--stream-modes %s: %v", showArg(*f.streamModes), err)
	}
	var sendBuffers []int
	for _, v := range strings.Split(*f.sendBuffers, ",") {
		b, err := stream.ParseSendBuffer(v)
		if err != nil {
			return bench.Options{}, usagef("bench", "--send-buffers %s: %v", showArg(*f.sendBuffers), err)
		}
		if slices.Contains(sendBuffers, b) {
			return bench.Options{}, usagef("bench", "--send-buffers %s: %s twice", showArg(*f.sendBuffers), v)
		}
		sendBuffers = append(sendBuffers, b)
	}
	workloads, err := bench.ParseWorkloads(*f.workloads)
	if err != nil {
		return bench.Options{}, usagef("bench", "--workloads %s: %v", showArg(*f.workloads), err)
	}
	failModes := strings.Split(*f.modes, ",")
	for _, m := range failModes {
		if m != bench.FailKill && m != bench.FailStop {
			return bench.Options{}, usagef("bench", "--modes %s: unknown failure %q (sigkill, sigstop)", showArg(*f.modes), m)
		}
	}
	witnessModes := map[string][]bool{"without": {false}, "with": {true}, "both": {false, true}}[*f.witness]
	if witnessModes == nil {
		return bench.Options{}, usagef("bench", "--witness %s: want without, with or both", showArg(*f.witness))
	}
	out := *f.out
	if out == "" {
		out = filepath.Join("bench", "results", time.Now().UTC().Format("20060102T150405Z"))
	}
	mem, _ := parseMemSize(f.mem) // checked by memFlag
	self, err := os.Executable()
	if err != nil {
		return bench.Options{}, err
	}
	return bench.Options{Quick: *f.quick, Runs: *f.runs, Out: out, Govmm: self, Log: os.Stderr,
		Boot: bench.BootConfig{Govmm: self, Guest: *f.guest, MemMiB: int(mem >> 20), Baseline: *f.baseline}, Modes: failModes, Witness: witnessModes,
		StreamModes: streamModes, Workloads: workloads, Window: f.window, Baseline: *f.baseline, Split: *f.split, SendBuffers: sendBuffers}, nil
}

// guestImage puts the default guest image into opts, building it only
// where a suite will boot it.
func (f *benchFlags) guestImage(opts *bench.Options, suites []string) error {
	if slices.Contains(suites, "failover-guest") || slices.Contains(suites, "overhead-guest") || slices.Contains(suites, "wire-guest") ||
		slices.Contains(suites, "migration-guest") {
		img, err := defaultImage()
		if err != nil {
			return err
		}
		opts.Boot.Kernel, opts.Boot.Initrd = img.Kernel, img.Initrd
	}
	if slices.Contains(suites, "boot") && (*f.guest == "default" || (*f.guest == "auto" && !bench.Emulated())) {
		if img, err := defaultImage(); err == nil {
			opts.Boot.Kernel, opts.Boot.Initrd, opts.Boot.Vmlinux = img.Kernel, img.Initrd, img.Vmlinux
		} else if *f.guest == "default" {
			return err
		}
	}
	return nil
}

// mergeBench is `govmm bench --merge DIR... failover-guest`: one report
// of several runs' trials, for a lab whose L1 may die before a long run
// ends.
func mergeBench(dirs, suites []string, out string, args []string) error {
	if !slices.Equal(suites, []string{"failover-guest"}) {
		return fmt.Errorf("--merge: only the failover-guest suite merges (got %v)", suites)
	}
	if out == "" {
		out = filepath.Join("bench", "results", time.Now().UTC().Format("20060102T150405Z"))
	}
	r, err := bench.MergeFailoverGuest(dirs, out)
	if err != nil {
		return err
	}
	section := r.Report()
	if err := bench.WriteReport(out, strings.TrimSpace("govmm bench "+strings.Join(args, " ")), map[string]string{"failover-guest": section}, suites); err != nil {
		return err
	}
	fmt.Printf("## failover-guest\n\n%s\nresults: %s\n", section, out)
	return nil
}
