// Package dirtier is govmm-dirtier, which dirties guest memory at a steady rate, the
// workload of the checkpoint benchmarks. It touches one byte in each 4 KiB
// page of a working set, cycling through it, paced in small time slices, and
// prints the achieved rate once a second:
//
//	govmm-dirtier --rate 64 --wss 256 --duration 30s
//
// It is no binary of its own: the guest's one multi-call binary (/init,
// package guestimg/guest/init) runs Main when called as govmm-dirtier
// (/bin/govmm-dirtier is a symbolic link to /init).
package dirtier

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"time"
)

// slice is the pacing granularity.
const slice = 5 * time.Millisecond

// Main runs the dirtier with the command-line arguments args (without
// argv[0]) and returns the exit status.
func Main(args []string) int {
	fs := flag.NewFlagSet("govmm-dirtier", flag.ContinueOnError)
	rate := fs.Float64("rate", 0, "dirty `MiB/s` (0: as fast as possible)")
	wss := fs.Int("wss", 64, "working set in `MiB`")
	duration := fs.Duration("duration", 0, "stop after this long (0: run forever)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: govmm-dirtier [--rate MiB/s] [--wss MiB] [--duration D]\n\n"+
			"Touches one byte per 4 KiB page of a working set, cycling, at a paced rate.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *wss <= 0 || *rate < 0 {
		fmt.Fprintln(os.Stderr, "govmm-dirtier: --wss must be positive and --rate not negative")
		return 2
	}
	run(os.Stdout, *rate*(1<<20), *wss<<20, *duration)
	return 0
}

func run(out *os.File, rate float64, wss int, duration time.Duration) {
	mem := make([]byte, wss)
	pages := int64(wss / pageSize)
	burst := burstPages(rate, slice)
	if rate == 0 {
		burst = 4096 // check the clock every 16 MiB
	}

	start := time.Now()
	var done, touched, idx int64
	var val byte = 1
	lastT, lastTouched := start, int64(0)
	for {
		now := time.Now()
		elapsed := now.Sub(start)
		if duration > 0 && elapsed >= duration {
			break
		}
		due := burst
		if rate > 0 {
			var skipped int64
			due, skipped = pace(rate, elapsed, done, burst)
			done += skipped
		}
		for range due {
			mem[idx*pageSize] = val
			if idx++; idx == pages {
				idx, val = 0, val+1
			}
		}
		done += due
		touched += due
		if d := now.Sub(lastT); d >= time.Second {
			n := touched - lastTouched
			fmt.Fprintf(out, "govmm-dirtier: %.1f MiB/s (%d pages/s), wss %d MiB\n",
				float64(n*pageSize)/(1<<20)/d.Seconds(), int64(float64(n)/d.Seconds()), wss>>20)
			lastT, lastTouched = now, touched
		}
		if rate > 0 && due < burst {
			time.Sleep(slice)
		}
	}
	fmt.Fprintf(out, "govmm-dirtier: done: %d pages in %v\n", touched, time.Since(start).Round(time.Millisecond))
}
