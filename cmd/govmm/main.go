// Command govmm runs Linux guests on KVM and keeps them highly available
// by replicating them, Remus-style, to a hot standby.
//
// It owns flags, wiring and user-facing output; the logic lives in the
// packages it calls.
package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
)

const usage = `govmm: a Remus-style replicating hypervisor on KVM

Usage:
  govmm run [flags] [-- CMD ARGS...]   boot a guest (the default image when no --kernel)
  govmm ctl [--api-sock PATH] COMMAND  control a running VM (info, pause, resume, snapshot, migrate, stats)
  govmm standby --listen HOST:PORT     keep a hot replica of a VM (or receive a migration); run it on failover
  govmm restore [flags] FILE           resume a VM from a snapshot file
  govmm witness --listen HOST:PORT     arbiter against split brain: generations and leases per VM
  govmm image build [flags]            build the default guest image
  govmm bench [flags] [SUITE...]       benchmarks against QEMU (CSV + report.md)
  govmm lab [flags] -- CMD ARGS...     run CMD in the lab (nested KVM under QEMU) where this host's KVM cannot boot Linux
  govmm help COMMAND                   help for one command

Run 'govmm COMMAND -h' for the flags of a command.
`

// exitError carries an exit status through main without printing.
type exitError struct{ status int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.status) }

func main() {
	// Components log through slog; people see warnings and errors unless
	// GOVMM_LOG=debug or info asks for more.
	level := slog.LevelWarn
	_ = level.UnmarshalText([]byte(os.Getenv("GOVMM_LOG")))
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
	os.Exit(realMain(os.Args[1:]))
}

func realMain(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "run":
		err = cmdRun(args[1:])
	case "image":
		err = cmdImage(args[1:])
	case "ctl":
		err = cmdCtl(args[1:])
	case "standby":
		err = cmdStandby(args[1:])
	case "restore":
		err = cmdRestore(args[1:])
	case "witness":
		err = cmdWitness(args[1:])
	case "bench":
		err = cmdBench(args[1:])
	case "lab":
		err = cmdLab(args[1:])
	case "help", "-h", "--help":
		if len(args) > 1 {
			return realMain([]string{args[1], "-h"})
		}
		fmt.Print(usage)
		return 0
	default:
		fmt.Fprintf(os.Stderr, "govmm: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	var ee exitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.status
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	}
	fmt.Fprintf(os.Stderr, "govmm: %v\n", err)
	return 1
}

// errUsage marks a usage error already reported by the flag package.
var errUsage = errors.New("usage")
