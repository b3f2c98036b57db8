package main

import (
	"fmt"

	"govmm/replicate"
	"govmm/vmm"
)

const restoreUsage = `Usage: govmm restore [flags] FILE

Resumes a VM from a snapshot written by 'govmm ctl snapshot --out FILE'.
Memory size and vCPU count come from the snapshot; give the same devices
as the VM had (--disk, --net, --mac), which the snapshot's devices are
matched against. The guest carries on where it was: processes, timers
and the console. With --paused it comes up at the snapshot's instant
without running: 'govmm ctl resume' lets it go ('ctl snapshot' meanwhile
writes the same machine again).

Flags:
`

func cmdRestore(args []string) error {
	var f runFlags
	fs := newFlagSet("restore", restoreUsage)
	f.registerDevices(fs)
	fs.BoolVar(&f.startPaused, "paused", false, "start paused at the snapshot's instant, until 'govmm ctl resume'")
	refuseFlags(fs, "does not apply to restore: the snapshot holds the guest's kernel, memory, vCPUs and network settings",
		"kernel", "initrd", "cmdline", "mem", "cpus", "guest-ip", "guest-gw")
	refuseFlags(fs, "does not apply to restore: protect the restored guest with 'govmm ctl replicate --to HOST:PORT' once it runs",
		"replicate-to", "epoch", "on-standby-loss", "witness", "witness-lease")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("restore", "want one snapshot file, got %d arguments", fs.NArg())
	}
	if err := defaultAPISock(fs, &f); err != nil {
		return err
	}
	path := fs.Arg(0)
	st, err := vmm.ReadSnapshotState(path)
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", path, err)
	}
	nics, disks, _, err := f.devices()
	if err != nil {
		return err
	}
	m, devs, err := newMachine(vmm.Config{MemSize: st.Memory.MemSize, CPUs: st.Memory.CPUs}, &f, nics, disks)
	if err != nil {
		return err
	}
	defer m.Close()
	defer devs.Close()
	if st, err = vmm.ReadSnapshot(path, m.Memory()); err != nil {
		return fmt.Errorf("snapshot %s: %w", path, err)
	}
	start := m.StartFrom
	if f.startPaused {
		start = m.StartFromPaused
	}
	if err := start(st); err != nil {
		return fmt.Errorf("restore %s: %w", path, err)
	}
	return supervise(m, &f, devs, replicate.NewNode(replicate.Booted, replicate.Takeover{}, nil))
}
