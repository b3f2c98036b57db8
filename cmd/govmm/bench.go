package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"govmm/bench"
)

const benchUsage = `Usage: govmm bench [flags] [SUITE...]

Runs benchmarks side by side with QEMU (when installed) and writes raw CSV
and report.md into --out (default bench/results/<timestamp>). Suites: boot.

boot: wall time from process start to the guest's ready line, and the
VMM's own memory (RSS minus guest RAM touched). --guest auto boots the
default guest where KVM runs guests at hardware speed, and a tiny guest
(a bzImage that prints the ready line at once) where it emulates them.

Flags:
`

func cmdBench(args []string) error {
	fs := newFlagSet("bench", benchUsage)
	runs := fs.Int("runs", 11, "trials per VMM")
	quick := fs.Bool("quick", false, "tiny parameters: proves the suites work, numbers mean little")
	out := fs.String("out", "", "results directory (default bench/results/<timestamp>)")
	guest := fs.String("guest", "auto", "boot suite guest: auto, tiny or default")
	mem := fs.Int("mem", 256, "guest memory in MiB")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	suites := fs.Args()
	if len(suites) == 0 {
		suites = []string{"boot"}
	}
	if *quick {
		*runs = 3
	}
	if *out == "" {
		*out = filepath.Join("bench", "results", time.Now().UTC().Format("20060102T150405Z"))
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	sections := map[string]string{}
	for _, s := range suites {
		switch s {
		case "boot":
			cfg := bench.BootConfig{Govmm: self, Guest: *guest, MemMiB: *mem, Runs: *runs, Out: *out, Log: os.Stderr}
			if *guest == "default" || *guest == "auto" {
				if img, err := defaultImage(); err == nil {
					cfg.Kernel, cfg.Initrd = img.Kernel, img.Initrd
				} else if *guest == "default" {
					return err
				}
			}
			samples, err := bench.Boot(ctx, cfg)
			if err != nil {
				return err
			}
			sections["boot"] = bench.BootReport(samples)
		default:
			return fmt.Errorf("unknown suite %q (boot)", s)
		}
	}
	command := "govmm bench " + strings.Join(args, " ")
	if err := bench.WriteReport(*out, command, sections, suites); err != nil {
		return err
	}
	for _, s := range suites {
		fmt.Printf("## %s\n\n%s\n", s, sections[s])
	}
	fmt.Printf("results: %s\n", *out)
	return nil
}
