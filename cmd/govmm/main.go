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
	"slices"
)

const usage = `govmm: a Remus-style replicating hypervisor on KVM

Usage:
  govmm run [flags] [-- CMD ARGS...]   boot a guest (the default image when no
                                       --kernel); --replicate-to protects it
  govmm standby --listen HOST:PORT     replication standby: a hot replica that
                                       runs the guest when the primary is lost;
                                       also a live migration's receiver
  govmm ctl [--api-sock PATH] COMMAND  control a running VM: info, pause,
                                       resume, snapshot, migrate, replicate,
                                       unreplicate, stats, metrics
  govmm restore [flags] FILE           resume a VM from a snapshot file
  govmm witness --listen HOST:PORT     arbiter against split brain: leases and
                                       generations per VM
  govmm image build [flags]            build the default guest image
  govmm bench [flags] [SUITE...]       benchmarks against QEMU (CSV, plots,
                                       report.md)
  govmm lab [flags] -- CMD ARGS...     run CMD in the lab (nested KVM under
                                       QEMU) where this host's KVM cannot boot
                                       Linux
  govmm version                        print the version (also --version)
  govmm help [COMMAND [SUBCOMMAND]]    help, e.g. 'govmm help ctl replicate'

Help goes to stdout and exits 0; 'govmm COMMAND -h' is the same as
'govmm help COMMAND'. A command line that cannot run as given exits with
status 2 and one line on stderr; a failure while running, with status 1.
`

// exitError carries an exit status through main without printing.
type exitError struct{ status int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.status) }

func main() {
	// Components log through slog; people see warnings and errors unless
	// GOVMM_LOG=debug or info asks for more, in govmm's own one-line form.
	level := slog.LevelWarn
	_ = level.UnmarshalText([]byte(os.Getenv("GOVMM_LOG")))
	slog.SetDefault(slog.New(newCLIHandler(os.Stderr, level)))
	os.Exit(realMain(os.Args[1:]))
}

// commands are govmm's commands by name.
var commands = map[string]func([]string) error{
	"run":     cmdRun,
	"image":   cmdImage,
	"ctl":     cmdCtl,
	"standby": cmdStandby,
	"restore": cmdRestore,
	"witness": cmdWitness,
	"bench":   cmdBench,
	"lab":     cmdLab,
	"version": cmdVersion,
}

func isHelp(arg string) bool {
	return arg == "help" || arg == "-h" || arg == "--help" || arg == "-help"
}

func realMain(args []string) int {
	return exitStatus(dispatch(args))
}

// dispatch runs the command args name. Help never recurses: "help X ..."
// asks command X for its help ("X ... -h"), and help of help is the
// top-level usage.
func dispatch(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return exitError{usageStatus}
	}
	switch {
	case isHelp(args[0]):
		rest := args[1:]
		if len(rest) == 0 || isHelp(rest[0]) {
			fmt.Print(usage)
			return nil
		}
		cmd, ok := commands[rest[0]]
		if !ok {
			return usagef("", "help: unknown command %q", rest[0])
		}
		return cmd(append(slices.Clone(rest[1:]), "-h"))
	case args[0] == "--version" || args[0] == "-version":
		return cmdVersion(args[1:])
	}
	cmd, ok := commands[args[0]]
	if !ok {
		return usagef("", "unknown command %q", args[0])
	}
	return cmd(args[1:])
}

// exitStatus reports err (unless it says nothing new) and returns the
// process's exit status: 0, 2 for a usage error, the status an exitError
// carries, 1 for any other failure.
func exitStatus(err error) int {
	var ee exitError
	var ue *usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ee):
		return ee.status
	case errors.As(err, &ue):
		printUsageError(os.Stderr, ue)
		return usageStatus
	}
	fmt.Fprintf(os.Stderr, "govmm: %v\n", err)
	return 1
}

func cmdVersion(args []string) error {
	fs := newFlagSet("version", "Usage: govmm version (or govmm --version)\n\nPrints govmm's version, the commit it was built from and the Go toolchain.\n")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("version", "unexpected argument %q", fs.Arg(0))
	}
	fmt.Println(version())
	return nil
}
