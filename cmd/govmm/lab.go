package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"syscall"
	"time"

	"govmm/guestimg"
	"govmm/lab"
)

const labUsage = `Usage: govmm lab [flags] -- CMD ARGS...

Runs CMD inside the lab: a Linux machine (L1) under QEMU's software
emulation of AMD SVM, whose kvm_amd gives govmm a /dev/kvm that boots stock
Linux guests. Use it where this host's KVM cannot (kvm_pvm, or a cloud VM
without nested virtualization). L1 sees this host's / read-only under a
throwaway overlay, so CMD finds your checkout, Go and the guest image as
they are here; what it writes is discarded unless it is under a --share.
CMD's output streams here and govmm lab exits with CMD's status.

Everything in the lab is emulated and slow: compare numbers measured side
by side inside it, never with numbers from outside. The L1 image is built
from the default guest's Debian packages on first use (~/.cache/govmm/lab)
and needs qemu-system-x86.

L1s run side by side while their vCPUs fit this host's CPUs (each vCPU
holds a CPU of this host: ~/.cache/govmm/lab/cpu-N.lock); others wait,
unless --share-cpus (two 2-vCPU L1s whose commands keep only CPU 0 busy
fill a 2-CPU host: scripts/guest-tests.sh runs them so).
QEMU's emulation of SVM crashes L1 or its guests now and then when guest
vCPUs move between L1's CPUs or are kicked from another; so CMD runs on
L1's CPU 0 (--pin), and L1's other vCPUs serve its own kernel. 1-vCPU L1s
did not crash either, but sometimes stopped making progress (see
docs/ARCHITECTURE.md, "The lab").

'govmm lab --needed' says, by its exit status, whether this host needs
the lab to boot Linux (0) or its KVM boots Linux itself (1).

Examples:
  govmm lab -- govmm run --cpus 2 -- nproc
  govmm lab --share bench/results -- govmm bench boot

Flags:
`

// cmdLab implements "govmm lab".
func cmdLab(args []string) error {
	fs := newFlagSet("lab", labUsage)
	cpus := fs.Int("cpus", 0, "L1's vCPUs (default: this host's CPUs, at most 4)")
	pin := fs.String("pin", "", "L1's CPUs to run CMD on, as taskset takes them (0, 0-1), or all (default 0 when L1 has more than one vCPU: guests crash less, see docs/ARCHITECTURE.md)")
	mem := fs.String("mem", "8G", "L1's memory")
	timeout := fs.Duration("timeout", 60*time.Minute, "give up (and kill L1) after this long")
	tcg := fs.String("tcg", os.Getenv("GOVMM_LAB_TCG"), "QEMU's TCG threading for L1: multi (one host thread per vCPU) or single (default multi, or $GOVMM_LAB_TCG)")
	cpuModel := fs.String("cpu-model", os.Getenv("GOVMM_LAB_CPU"), "L1's CPU, as QEMU's -cpu takes it; it needs SVM with nested paging (default "+lab.DefaultCPUModel+": the max model as a recent AMD family, see docs/ARCHITECTURE.md, \"The lab\"; or $GOVMM_LAB_CPU)")
	qemu := fs.String("qemu", os.Getenv("GOVMM_LAB_QEMU"), "L1's emulator: '"+lab.QEMUBackports+"' (Debian 12 only): the later QEMU of "+guestimg.LabQEMUSuite+", fetched once into the cache, without the faults of Debian 12's own 7.2; '"+lab.QEMUSystem+"': qemu-system-x86_64 from PATH; or a QEMU binary's path (default $GOVMM_LAB_QEMU, else '"+lab.QEMUBackports+"' on Debian 12 falling back to '"+lab.QEMUSystem+"' when the fetch fails (a failure is remembered for an hour; '"+lab.QEMUBackports+"' fetches again regardless), and '"+lab.QEMUSystem+"' elsewhere; docs/ARCHITECTURE.md, \"The lab\")")
	retries := fs.Int("retries", 1, "run again this many times when L1 itself dies (not when CMD fails)")
	traceKVM := fs.Bool("trace-kvm", os.Getenv("GOVMM_LAB_TRACE_KVM") == "1", "turn KVM's trace events on in L1 before CMD starts (the real-guest tests print the last ones when they fail); off by default because turning them on has wedged L1 (default $GOVMM_LAB_TRACE_KVM == 1)")
	holdKVM := fs.Bool("hold-kvm", false, "inside L1 (the harness starts it): hold one idle VM open until killed, so that L1's kernel does not rewrite its code as the command's VMs come and go")
	ifNeeded := fs.Bool("if-needed", false, "run CMD directly on this host when its KVM boots Linux")
	shareCPUs := fs.Bool("share-cpus", false, "boot L1 even while other L1s hold this host's CPUs (its vCPUs then share them with theirs)")
	needed := fs.Bool("needed", false, "exit 0 if this host needs the lab to boot Linux, 1 if its KVM boots Linux (no CMD)")
	var shares, env listFlag
	fs.Var(&shares, "share", "host `DIR` that L1 mounts writable at the same path (repeatable)")
	fs.Var(&env, "env", "`NAME=VALUE` for CMD's environment (repeatable)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	command := fs.Args()
	if err := refuseWithoutCommand(fs, command); err != nil {
		return err
	}
	if *holdKVM {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return lab.HoldKVM(ctx, func() { fmt.Println("lab: holding one idle VM on /dev/kvm") })
	}
	if *needed {
		if lab.Emulated() == "" {
			return exitError{1}
		}
		return nil
	}
	if len(command) == 0 {
		return usagef("lab", "no command: govmm lab [flags] -- CMD ARGS...")
	}
	memSize, err := parseMemSize(*mem)
	if err != nil {
		return usagef("lab", "--mem %s: %v", showArg(*mem), err)
	}
	if *retries < 0 {
		return fmt.Errorf("--retries %d: must not be negative", *retries)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *ifNeeded && lab.Emulated() == "" {
		fmt.Fprintln(os.Stderr, "lab: this host's KVM boots Linux; running the command here")
		return runHere(ctx, command, env)
	}
	if lab.InLab() {
		return errors.New("already inside the lab (nested labs are not supported)")
	}
	r := *retries
	if r == 0 {
		r = -1
	}
	status, err := lab.Run(ctx, lab.Config{
		Command: command, Env: env, Shares: shares, QEMU: *qemu, Holder: holder(), TraceKVM: *traceKVM,
		CPUs: *cpus, ShareCPUs: *shareCPUs, Pin: *pin, MemMiB: int(memSize >> 20), TCG: *tcg, CPUModel: *cpuModel, Timeout: *timeout, Retries: r,
		Stdout: os.Stdout, Log: os.Stderr,
	})
	if err != nil {
		return err
	}
	if status != 0 {
		return exitError{status}
	}
	return nil
}

// refuseWithoutCommand refuses a command, and every other flag, beside
// --hold-kvm or --needed: they run no L1 and no command, so the flags that
// shape either would be ignored.
func refuseWithoutCommand(fs *flag.FlagSet, command []string) error {
	for _, only := range []string{"hold-kvm", "needed"} {
		if !given(fs)[only] {
			continue
		}
		if len(command) > 0 {
			return usagef("lab", "--%s takes no command", only)
		}
		others := []string{"cpus", "pin", "mem", "timeout", "tcg", "cpu-model", "qemu", "retries", "share-cpus", "trace-kvm", "if-needed", "share", "env", "hold-kvm", "needed"}
		others = slices.DeleteFunc(others, func(n string) bool { return n == only })
		if err := refuseUnused(fs, "with --"+only+", which runs no command", others...); err != nil {
			return err
		}
	}
	return nil
}

// runHere runs command on this host, as the lab would have run it inside.
func runHere(ctx context.Context, command, env []string) error {
	cmd := exec.CommandContext(ctx, command[0], command[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), env...)
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return exitError{ee.ExitCode()}
		}
		return err
	}
	return nil
}

// holder is the argv that holds one idle VM in L1 (govmm lab --hold-kvm,
// this binary), or nil when this binary cannot say where it is.
func holder() []string {
	exe, err := os.Executable()
	if err != nil {
		return nil
	}
	return []string{exe, "lab", "--hold-kvm"}
}
