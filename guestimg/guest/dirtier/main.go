// Command govmm-dirtier dirties guest memory at a steady rate, the
// workload of the checkpoint benchmarks. It touches one byte in each 4 KiB
// page of a working set, cycling through it, paced in small time slices, and
// prints the achieved rate once a second:
//
//	govmm-dirtier --rate 64 --wss 256 --duration 30s
package main

import (
	"flag"
	"fmt"
	"os"
	"time"
)

// slice is the pacing granularity.
const slice = 5 * time.Millisecond

func main() {
	rate := flag.Float64("rate", 0, "dirty `MiB/s` (0: as fast as possible)")
	wss := flag.Int("wss", 64, "working set in `MiB`")
	duration := flag.Duration("duration", 0, "stop after this long (0: run forever)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: govmm-dirtier [--rate MiB/s] [--wss MiB] [--duration D]\n\n"+
			"Touches one byte per 4 KiB page of a working set, cycling, at a paced rate.\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *wss <= 0 || *rate < 0 {
		fmt.Fprintln(os.Stderr, "govmm-dirtier: --wss must be positive and --rate not negative")
		os.Exit(2)
	}
	run(os.Stdout, *rate*(1<<20), *wss<<20, *duration)
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
