// Package kvmtest holds the checks that tests needing KVM share: whether
// /dev/kvm is usable here, and whether it runs guests at hardware speed.
package kvmtest

import (
	"os"
	"sync"
	"testing"
)

// Require skips t when /dev/kvm is absent or cannot be opened, saying so.
func Require(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("skipping: needs /dev/kvm (%v)", err)
	}
	f.Close()
}

var (
	emuOnce   sync.Once
	emuReason string
)

// Emulated reports why KVM on this host cannot run a stock Linux kernel in
// reasonable time, or "" when it can. Some sandboxes (kvm_pvm, the
// pagetable-based virtual machine) provide /dev/kvm without VMX/SVM and
// run any guest that is not a PVM guest kernel instruction by instruction
// in the host kernel's emulator, some thousand times slower than hardware:
// a Linux boot takes hours there.
func Emulated() string {
	emuOnce.Do(func() {
		if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
			emuReason = "KVM on this host is kvm_pvm, which emulates non-PVM guests instruction by instruction (about 3 µs each); a stock kernel would take hours to boot"
		}
	})
	return emuReason
}

// RequireLinuxBoot skips t unless KVM here can boot the real default guest
// in reasonable time, saying why not.
func RequireLinuxBoot(t testing.TB) {
	t.Helper()
	Require(t)
	if r := Emulated(); r != "" {
		t.Skipf("skipping real-guest test: %s; run it on a host whose CPU exposes VMX or SVM", r)
	}
}
