// Command democlient drives the default guest's demo service over one
// keep-alive TCP connection for a while, printing every answer, then
// checks the history it saw against the service's log (see package
// democlient). scripts/demo.sh runs it across a failover.
//
// Usage: democlient [-for 20s] [-every 100ms] HOST:PORT
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"govmm/internal/democlient"
)

func main() {
	dur := flag.Duration("for", 20*time.Second, "how long to drive the service")
	every := flag.Duration("every", 100*time.Millisecond, "pause between requests")
	timeout := flag.Duration("timeout", time.Minute, "give up on one answer after this long")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: democlient [-for DUR] [-every DUR] HOST:PORT")
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *dur, *every, *timeout); err != nil {
		fmt.Fprintf(os.Stderr, "democlient: %v\n", err)
		os.Exit(1)
	}
}

func run(addr string, dur, every, timeout time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := democlient.Dial(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Timeout = timeout
	local := c.LocalAddr()
	fmt.Printf("client: one TCP connection %s -> %s\n", local, addr)
	start := time.Now()
	var longest time.Duration
	var longestAt time.Time
	for i := 1; time.Since(start) < dur && ctx.Err() == nil; i++ {
		t0 := time.Now()
		n, err := c.Incr()
		if err != nil {
			return fmt.Errorf("after %d good answers: %w", i-1, err)
		}
		line := fmt.Sprintf("line %d", i)
		lines, err := c.Append(line)
		if err != nil {
			return fmt.Errorf("after %d good answers: %w", i-1, err)
		}
		took := time.Since(t0)
		if took > longest {
			longest, longestAt = took, t0
		}
		fmt.Printf("client: %6.2fs  /incr -> %-4d /append %q -> %d lines  (%v)\n",
			time.Since(start).Seconds(), n, line, lines, took.Round(time.Millisecond))
		time.Sleep(every)
	}
	log, err := c.Log()
	if err != nil {
		return err
	}
	h := c.History()
	if len(h.Counter) == 0 {
		return fmt.Errorf("no answers within %v", dur)
	}
	if err := h.Check(log); err != nil {
		return err
	}
	fmt.Printf("client: history checks out: counter %d..%d with no value lost or repeated; %d acknowledged lines, all in the log (%d lines); the same connection (%s) throughout\n",
		h.Counter[0], h.Counter[len(h.Counter)-1], len(h.Lines), len(log), local)
	fmt.Printf("client: longest wait for an answer: %v, at %.2fs\n", longest.Round(time.Millisecond), longestAt.Sub(start).Seconds())
	return nil
}
