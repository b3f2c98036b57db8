package bench

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"govmm/internal/tinyguest"
	"govmm/lab"
	"govmm/replicate"
	"govmm/replicate/stream"
	"govmm/replicate/witness"
	"govmm/vmm"
	"govmm/vmm/guestmem"
)

// Where the tiny dirtying guests of the replication suites keep their
// working set and their pass counter.
const (
	dirtyBase = 0x400000 // 4 MiB, above the guest's code
	passGPA   = 0x8000
)

// guestCode is the tiny guest for a working set of pages: the Dirtier, or
// the Counter (one page, the counter's) when pages is 0.
func guestCode(pages int) []byte {
	if pages <= 0 {
		return tinyguest.Counter(passGPA)
	}
	return tinyguest.Dirtier(dirtyBase, uint32(pages), passGPA)
}

// memFor is a guest size that holds a working set of pages above
// dirtyBase: a power of two, at least 64 MiB.
func memFor(pages int) uint64 {
	need := uint64(dirtyBase) + uint64(pages)*guestmem.PageSize + 1<<20
	size := uint64(64 << 20)
	for size < need {
		size *= 2
	}
	return size
}

// newTinyMachine builds (but does not start) a one-vCPU machine running
// the tiny guest for pages.
func newTinyMachine(pages int, memSize uint64) (*vmm.Machine, error) {
	return vmm.New(vmm.Config{MemSize: memSize, CPUs: 1, Kernel: tinyguest.Kernel(guestCode(pages)),
		Initrd: []byte("x"), Cmdline: "x", Console: io.Discard})
}

// passes reads the tiny guest's pass counter.
func passes(m *vmm.Machine) uint64 {
	b, err := m.Memory().Slice(passGPA, 8)
	if err != nil {
		return 0
	}
	return binary.LittleEndian.Uint64(b)
}

// waitPasses waits until the guest has done n more passes.
func waitPasses(ctx context.Context, m *vmm.Machine, n uint64, timeout time.Duration) error {
	start := passes(m)
	deadline := time.Now().Add(timeout)
	for passes(m) < start+n {
		if time.Now().After(deadline) {
			return fmt.Errorf("guest made %d of %d passes in %v", passes(m)-start, n, timeout)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}

// runningStandby is an in-process standby of tiny guests, listening on
// addr; stop (idempotent) ends it and waits for it.
type runningStandby struct {
	addr string
	stop func()
}

// startStandby starts an in-process standby (with witness client wc, if
// any) that follows one replication and discards what it received: a
// takeover there would be a bench failure, which the primary's Recent
// shows.
func startStandby(ctx context.Context, wc *witness.Client) (runningStandby, error) {
	return startStandbyWith(ctx, wc, false)
}

// startStandbyWith is startStandby, accepting stream deltas or not.
func startStandbyWith(ctx context.Context, wc *witness.Client, deltas bool) (runningStandby, error) {
	sb, err := replicate.NewStandby(replicate.StandbyConfig{Listen: "127.0.0.1:0", Insecure: true,
		FailoverTimeout: 10 * time.Second, Logger: quietLogger(), Witness: wc, Build: tinyReplica, Deltas: deltas})
	if err != nil {
		return runningStandby{}, err
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if sm, _, err := sb.ReceiveReplication(sctx); err == nil {
			sm.Close()
		}
	}()
	var once sync.Once
	return runningStandby{addr: sb.Addr(), stop: func() {
		once.Do(func() {
			cancel()
			<-done
			sb.Close()
		})
	}}, nil
}

// newStandby is a standby for a migration of a tiny guest.
func newStandby() (*replicate.Standby, error) {
	return replicate.NewStandby(replicate.StandbyConfig{Listen: "127.0.0.1:0", Insecure: true,
		FailoverTimeout: 10 * time.Second, Logger: quietLogger(), Build: tinyReplica})
}

// tinyReplica builds a standby's machine for a tiny guest.
func tinyReplica(id stream.Identity) (replicate.Replica, error) {
	m, err := vmm.New(vmm.Config{MemSize: replicate.MemSize(id), CPUs: int(id.VCPUs), Console: io.Discard})
	return replicate.Replica{Machine: m}, err
}

// platform is the sentence every suite's report carries about KVM here.
func platform() string {
	if lab.InLab() {
		return "**Lab numbers**: this ran inside the lab's L1 (Debian's kernel with kvm_amd on QEMU's software-emulated SVM), " +
			"where everything, the guest and both VMMs included, is emulated and many times slower than on hardware. " +
			"Compare the VMMs side by side (the ratio); do not compare the times with numbers from outside the lab."
	}
	if r := lab.Emulated(); r != "" {
		return "**KVM here emulates guests**: " + r + ". Guest-side rates below are those of an emulated CPU; " +
			"VMM-side costs (harvest, copy, state, streaming) are real host work."
	}
	return "KVM here is hardware-assisted."
}

func leUint64(b []byte) uint64       { return binary.LittleEndian.Uint64(b) }
func putLeUint64(b []byte, v uint64) { binary.LittleEndian.PutUint64(b, v) }

// quietLogger drops replicate's lifecycle logs, which would drown the
// bench's own progress lines.
func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
