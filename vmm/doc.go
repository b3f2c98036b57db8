// Package vmm owns one virtual machine: guest memory and its layout, the
// Linux x86 boot protocol (bzImage, boot_params, e820, command line,
// initramfs), the MP table for SMP, CPUID and MSR setup, the vCPU run loops
// (one OS thread each), the PIO and MMIO buses, the legacy devices (8250
// UART, i8042 reset, CMOS RTC, the exit port, the PCI host bridge) and
// pause/resume of all vCPUs at a consistent point, and MachineState, the
// one description of the machine at a cut: vCPUs, interrupt controllers,
// clock and every device (the UART, the i8042 and the RTC here, the PCI
// functions through devstate.Stateful), restored with StartFrom or, not
// yet running, StartFromPaused (docs/STATE.md), and snapshot files. Both
// are encoded as containers of package vmm/container (docs/FORMATS.md):
// a state's sections are walked by one function for save and restore
// (stateenc.go); a checkpoint saves through EncodeState (statesave.go),
// the same bytes with buffers kept from cut to cut. It owns the KVM VM file
// descriptor and the memory slots: dirty tracking for migration and
// replication starts here (Machine.TrackDirty, one tracker at a time), and
// no other package touches the VM fd.
//
// It does not own replication policy or network I/O: devices that do
// (virtio) satisfy the small interfaces here and in vmm/pci, and the
// command wires them in.
//
// Who owns what:
//   - each vCPU goroutine owns its kvmapi.VCPU fd and its OS thread; other
//     goroutines reach it only through its request channel.
//   - the buses are immutable after Start except for PCI BAR mappings,
//     which take the bus's write lock.
//   - devices guard their own registers; they are called from vCPU
//     threads and must not block.
package vmm
