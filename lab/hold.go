package lab

import (
	"context"
	"fmt"

	"govmm/kvmapi"
)

// HoldKVM keeps one idle VM (in-kernel irqchip, one vCPU that never runs)
// open on L1's /dev/kvm until ctx ends. The harness starts it in L1 before
// the command (govmm lab --hold-kvm), because L1's kernel rewrites its own
// code whenever the number of VMs goes from 0 to 1 or back (KVM's preempt
// notifiers and its APIC state are static keys; the first and last VM also
// turn SVM on and off on every CPU by IPI), and QEMU's multi-threaded
// emulation of such a rewrite, while another vCPU runs the code being
// patched, has wedged L1 (an RCU stall, the other CPU spinning in the
// int3 handler of text_poke_bp: docs/ARCHITECTURE.md, "The lab"). With one
// VM always there, the tests' VMs come and go without a rewrite. ready is
// called once the VM and its vCPU exist.
func HoldKVM(ctx context.Context, ready func()) error {
	sys, err := kvmapi.Open("/dev/kvm")
	if err != nil {
		return fmt.Errorf("hold kvm: %w", err)
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		return fmt.Errorf("hold kvm: %w", err)
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		return fmt.Errorf("hold kvm: %w", err)
	}
	vcpu, err := vm.CreateVCPU(0)
	if err != nil {
		return fmt.Errorf("hold kvm: %w", err)
	}
	defer vcpu.Close()
	ready()
	<-ctx.Done()
	return nil
}
