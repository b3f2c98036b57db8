package lab

import (
	"bytes"
	"os"
	"sync"

	"govmm/kvmapi"
)

var (
	hostOnce   sync.Once
	hostReason string
)

// Emulated reports why this host's KVM cannot boot a stock Linux kernel in
// reasonable time, or "" when it can (and then the lab is not needed).
// Some sandboxes (kvm_pvm, the pagetable-based virtual machine) provide
// /dev/kvm without VMX/SVM and run any guest that is not a PVM guest
// kernel instruction by instruction in the host kernel, some thousand
// times slower than hardware: a Linux boot takes hours there. Inside the
// lab, L1's kvm_amd runs on QEMU's emulated SVM; that is slow too, but
// only as slow as everything else there, so Emulated is "" in L1.
func Emulated() string {
	hostOnce.Do(func() {
		if _, err := os.Stat("/dev/kvm"); err != nil {
			hostReason = "this host has no /dev/kvm"
			return
		}
		if kvmapi.IsPVM() {
			hostReason = "KVM on this host is kvm_pvm, which emulates non-PVM guests instruction by instruction (about 3 µs each); a stock kernel would take hours to boot"
			return
		}
		cpuinfo, _ := os.ReadFile("/proc/cpuinfo")
		if !bytes.Contains(cpuinfo, []byte(" vmx")) && !bytes.Contains(cpuinfo, []byte(" svm")) {
			hostReason = "this host's CPU exposes neither VMX nor SVM, so its KVM cannot run guests in hardware"
		}
	})
	return hostReason
}

// InLab reports whether this process runs inside the lab's L1.
func InLab() bool { return os.Getenv("GOVMM_LAB") == "1" }
