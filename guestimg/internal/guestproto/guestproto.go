// Package guestproto is the contract between the image builder (guestimg),
// the guest's /init and the VMM: file paths inside the initramfs, the line
// that announces a ready guest, and the I/O port that carries the exit
// status of command mode. It has no code, so the guest programs can import
// it without pulling the builder in.
package guestproto

const (
	// ReadyLine is printed on its own line on the console by /init once
	// modules, network, disk and the demo service are up (never in command
	// mode).
	ReadyLine = "govmm-guest: ready"

	// BootTraceLine starts the line /init prints just before ReadyLine:
	// key=value pairs follow, each the kernel's printk clock in
	// microseconds at a point of the boot ("unpack", "unpacked",
	// "run-init": the kernel's messages for initramfs unpacking, its end,
	// and the start of /init) and "now" as the line is printed. The VMM's
	// boot trace (internal/boottrace) reads it.
	BootTraceLine = "govmm-guest: boot-trace"

	// CommandPath holds the argv of command mode, each argument terminated
	// by a NUL byte. The VMM appends it to the initrd as a cpio archive.
	CommandPath = "/govmm/cmd"

	// ModulesPath lists the kernel modules to load, one per line, in load
	// order (dependencies first): the module's absolute path, then the
	// devices it is needed for (NeedVirtioNet, NeedVirtioBlk), separated
	// by spaces. /init loads a module when the PCI bus has one of its
	// devices, or when the line names none.
	ModulesPath = "/etc/govmm/modules"

	// NeedVirtioNet and NeedVirtioBlk name the devices of ModulesPath's
	// lines: a virtio network card, a virtio disk.
	NeedVirtioNet = "virtio-net"
	NeedVirtioBlk = "virtio-blk"

	// ExitPort is the I/O port to which /init writes one byte: the exit
	// status of the command (command mode) or 0 on poweroff. The VMM exits
	// with that status.
	ExitPort = 0x600
)
