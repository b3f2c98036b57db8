// Package kvmtest holds the checks that tests needing KVM share: whether
// /dev/kvm is usable here, and whether it boots the real default guest
// (directly on hardware-assisted KVM, or inside the lab); and the record
// of the tests it skipped for want of /dev/kvm, which make test then runs
// in the lab (SkipsEnv).
package kvmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"govmm/lab"
)

// Require skips t when /dev/kvm is absent or cannot be opened, saying so
// (and recording the skip where SkipsEnv asks). Inside the lab a missing
// /dev/kvm is a failure, never a skip.
func Require(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		if lab.InLab() {
			t.Fatalf("the lab's L1 has no usable /dev/kvm: %v", err)
		}
		recordSkip(t)
		t.Skipf("skipping: needs /dev/kvm (%v)", err)
	}
	f.Close()
}

// SkipsEnv names a file to which Require appends a line for each test it
// skips: the test binary's directory (its package's, symbolic links
// resolved), a tab, and the top-level test's name. make test sets it for
// its host stage, and scripts/kvm-tests.sh then runs in the lab just the
// tests listed, the ones that ran nowhere else.
const SkipsEnv = "GOVMM_KVMTEST_SKIPS"

// recordSkip appends t's line to the file SkipsEnv names, if it is set.
// A line it cannot write fails t: the lab would not run that test, and
// nothing else would either.
func recordSkip(t testing.TB) {
	t.Helper()
	path := os.Getenv(SkipsEnv)
	if path == "" {
		return
	}
	dir, err := os.Getwd()
	if err == nil {
		dir, err = filepath.EvalSymlinks(dir)
	}
	if err != nil {
		t.Fatalf("%s: %v", SkipsEnv, err)
	}
	name, _, _ := strings.Cut(t.Name(), "/")
	// One write with O_APPEND: the test binaries of go test ./... append
	// side by side, and each line lands whole.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatalf("%s: %v", SkipsEnv, err)
	}
	_, err = f.Write(fmt.Appendf(nil, "%s\t%s\n", dir, name))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("%s: %v", SkipsEnv, err)
	}
}

// GuestPrefix starts the name of every test that boots the real default
// guest: make test runs those (and only those) where a Linux guest can
// boot, which on hosts like this project's is inside the lab
// (scripts/guest-tests.sh).
const GuestPrefix = "TestGuest"

// RequireLinuxBoot marks t as a real-guest test. It fails t when its name
// does not start with GuestPrefix (so that no real-guest test escapes the
// lab run), logs where the guest runs, and skips t only outside the lab on
// a host whose KVM cannot boot Linux, saying how to run it. Inside the lab
// it never skips: a real-guest test that cannot run there fails.
func RequireLinuxBoot(t testing.TB) {
	t.Helper()
	if !strings.HasPrefix(t.Name(), GuestPrefix) {
		t.Fatalf("real-guest test %s: its name must start with %s so that make test runs it where Linux boots", t.Name(), GuestPrefix)
	}
	Require(t)
	switch r := lab.Emulated(); {
	case lab.InLab():
		t.Logf("real guest in the lab (L1: kvm_amd on QEMU's emulated SVM)")
	case r != "":
		t.Skipf("skipping real-guest test here: %s; make test runs it in the lab (scripts/guest-tests.sh)", r)
	default:
		t.Logf("real guest on this host's KVM")
	}
}
