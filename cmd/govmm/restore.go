package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"govmm/replicate"
	"govmm/virtio/netback"
	"govmm/vmm"
)

const restoreUsage = `Usage: govmm restore [flags] FILE [flags]

Resumes a VM from a snapshot written by 'govmm ctl snapshot --out FILE'.
Memory size and vCPU count come from the snapshot, and so do its devices:
a snapshot records the device flags the VM ran with (--net and its
--publish ports, --disk, --mac, --name), and restore rebuilds the same
devices without being told again. Flags override what is specific to
this host: --net tap:NAME another TAP (the kind of network stays the
snapshot's), --publish other host ports (all of them), --disk other
image paths (as many disks as the VM had). Snapshots older than that
(format 2) record no devices: give the VM's --net, --disk and --mac, or
restore uses --net user and no disk and says so.

The guest carries on where it was: processes, timers and the console.
With --paused it comes up at the snapshot's instant without running:
'govmm ctl resume' lets it go ('ctl snapshot' meanwhile writes the same
machine again).

A restored guest starts unprotected: 'govmm ctl replicate --to HOST:PORT'
protects it, with the --key-file, --failover-timeout, --stream-compress,
--stream-deltas and --stream-cipher given here; 'ctl migrate' moves it,
with the same --key-file and stream flags.

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
		"replicate-to", "epoch", "epoch-max", "on-standby-loss", "witness", "witness-lease", "ack-spin")
	files, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(files) != 1 {
		return usagef("restore", "want one snapshot file, got %d arguments", len(files))
	}
	path := files[0]
	hdr, err := vmm.ReadSnapshotHeader(path)
	if err != nil {
		return fmt.Errorf("snapshot %s: %w", path, err)
	}
	set := given(fs)
	if hdr.Config == nil {
		if !set["net"] && !set["disk"] && !set["mac"] && !set["name"] && !set["publish"] {
			fmt.Fprintf(os.Stderr, "govmm: notice: snapshot %s (format %d) does not record its devices: restoring with --net user, no disk and the default MAC; give the VM's --net, --disk and --mac if they differed\n", path, hdr.Version)
		}
	} else if err := f.applySnapshotConfig(set, hdr.Config); err != nil {
		return fmt.Errorf("snapshot %s: %w", path, err)
	}
	// The default socket derives from --name, which the snapshot may set.
	if err := defaultAPISock(fs, &f); err != nil {
		return err
	}
	st := hdr.State
	nics, disks, _, err := f.devices()
	if err != nil {
		return err
	}
	m, devs, err := newMachine(vmm.Config{MemSize: st.Memory.MemSize, CPUs: st.Memory.CPUs, DirtyTracking: f.dirtyTracking}, &f, nics, disks)
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

// parseInterspersed parses fs's flags wherever they stand among the
// positional arguments ('restore snap.bin --net none'), which the flag
// package alone stops at, and returns the positional arguments in order.
// Everything after a "--" is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := parseFlags(fs, args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if argsHadDashDash(args, rest) {
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

// Settings of a snapshot's config (vmm.SnapshotConfig), named after the
// flags of 'govmm run' they record.
const (
	settingName        = "name"
	settingNet         = "net"
	settingMAC         = "mac"
	settingPublish     = "publish" // one per --publish, in order
	settingDisk        = "disk"    // one per --disk, in order; the path absolute
	settingGuestIP     = "guest-ip"
	settingGuestGW     = "guest-gw"
	settingNoIOEventFD = "no-ioeventfd"
)

// snapshotConfig records the flags that shaped the VM's devices, for its
// snapshots. The MAC is recorded as the guest has it (the default one
// derives from --name), disk paths absolute, so that a restore under
// another name or from another directory builds the same devices.
func (f *runFlags) snapshotConfig() vmm.SnapshotConfig {
	mac := f.mac
	if mac == "" {
		mac = netback.DefaultMAC(f.name).String()
	}
	cfg := vmm.SnapshotConfig{{Name: settingName, Value: f.name}, {Name: settingNet, Value: f.net}, {Name: settingMAC, Value: mac}}
	for _, p := range f.publish {
		cfg = append(cfg, vmm.Setting{Name: settingPublish, Value: p})
	}
	for _, d := range f.disks {
		if path, opts, _ := strings.Cut(d, ","); path != "" {
			if abs, err := filepath.Abs(path); err == nil {
				d = abs
				if opts != "" {
					d += "," + opts
				}
			}
		}
		cfg = append(cfg, vmm.Setting{Name: settingDisk, Value: d})
	}
	if f.guestIP != "" {
		cfg = append(cfg, vmm.Setting{Name: settingGuestIP, Value: f.guestIP})
	}
	if f.guestGW != "" {
		cfg = append(cfg, vmm.Setting{Name: settingGuestGW, Value: f.guestGW})
	}
	if f.noIOEventFD {
		cfg = append(cfg, vmm.Setting{Name: settingNoIOEventFD, Value: "true"})
	}
	return cfg
}

// applySnapshotConfig fills f from a snapshot's config, except for the
// flags the command line set (set), which override it. The kind of
// network and the number of disks are the guest's own (its PCI devices):
// an override may change where they lead on this host, not what they are.
func (f *runFlags) applySnapshotConfig(set map[string]bool, cfg vmm.SnapshotConfig) error {
	var publish, disks listFlag
	for _, s := range cfg {
		switch s.Name {
		case settingName:
			if !set["name"] {
				f.name = s.Value
			}
		case settingNet:
			if !set["net"] {
				f.net = s.Value
			} else if netKind(f.net) != netKind(s.Value) {
				return fmt.Errorf("--net %s: the VM had --net %s, and a restored guest keeps its devices (leave --net out, or name another TAP with tap:NAME)", f.net, s.Value)
			}
		case settingMAC:
			if !set["mac"] {
				f.mac = s.Value
			}
		case settingPublish:
			publish = append(publish, s.Value)
		case settingDisk:
			disks = append(disks, s.Value)
		case settingGuestIP:
			f.guestIP = s.Value
		case settingGuestGW:
			f.guestGW = s.Value
		case settingNoIOEventFD:
			if !set["no-ioeventfd"] {
				f.noIOEventFD = s.Value == "true"
			}
		default:
			return fmt.Errorf("setting %q unknown to this govmm", s.Name)
		}
	}
	if !set["publish"] {
		f.publish = publish
	}
	if !set["disk"] {
		f.disks = disks
	} else if len(f.disks) != len(disks) {
		return fmt.Errorf("%d --disk given, but the VM had %d disks, and a restored guest keeps its devices", len(f.disks), len(disks))
	}
	return nil
}

// netKind is the kind of a --net value: none, user or tap.
func netKind(net string) string {
	kind, _, _ := strings.Cut(net, ":")
	return kind
}
