package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
)

// benchSignals is the context of a bench run. SIGINT and SIGTERM cancel
// it instead of killing govmm on the spot, so that the running suite
// stops its trial, kills the process groups it started (QEMU, govmm run,
// standby, witness) and removes its temporary directories on the way out:
// a process killed by the signal's default action would leave them all
// behind. caught is the signal that cancelled it (0: none); stop
// releases the signals.
func benchSignals() (ctx context.Context, caught func() syscall.Signal, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	var got atomic.Int32
	done := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			got.Store(int32(s.(syscall.Signal)))
			fmt.Fprintf(os.Stderr, "govmm: bench: %v: stopping the trial, its processes and temporary files\n", s)
			cancel()
		case <-done:
		}
	}()
	caught = func() syscall.Signal { return syscall.Signal(got.Load()) }
	stop = func() {
		signal.Stop(sigs)
		close(done)
		cancel()
	}
	return ctx, caught, stop
}
