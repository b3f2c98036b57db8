package vmm

import (
	"errors"
	"testing"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/kvmapi"
)

// BenchmarkSaveStateParts times each part of SaveState + MarshalBinary on
// a paused 1-vCPU tiny machine: the round trip to the vCPU thread, each
// vCPU ioctl, the VM-wide ioctls, the devices and the encoding. Each part
// reports ns per call as its own metric.
func BenchmarkSaveStateParts(b *testing.B) {
	m := pausedCounter(b)
	onVCPU := func(name string, fn func(fd *kvmapi.VCPU) error) {
		b.Run(name, func(b *testing.B) {
			err := m.OnVCPUs(func(_ int, fd *kvmapi.VCPU) error {
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if err := fn(fd); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
	here := func(name string, fn func() error) {
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if err := fn(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	here("onvcpus-roundtrip", func() error { return m.OnVCPUs(func(int, *kvmapi.VCPU) error { return nil }) })
	onVCPU("run-immediate", func(fd *kvmapi.VCPU) error {
		_, err := fd.Run()
		if errors.Is(err, kvmapi.ErrInterrupted) {
			return nil
		}
		return err
	})
	here("broadcast-kick", func() error {
		return m.broadcastWhile(reqDo, func(int, *kvmapi.VCPU) error { return nil }, nil, true)
	})
	onVCPU("mpstate", func(fd *kvmapi.VCPU) error { _, err := fd.MPState(); return err })
	onVCPU("regs", func(fd *kvmapi.VCPU) error { _, err := fd.Regs(); return err })
	onVCPU("sregs", func(fd *kvmapi.VCPU) error { _, err := fd.Sregs(); return err })
	onVCPU("xcrs", func(fd *kvmapi.VCPU) error { _, err := fd.XCRs(); return err })
	onVCPU("xsave", func(fd *kvmapi.VCPU) error { _, err := fd.Xsave(m.xsave); return err })
	onVCPU("lapic", func(fd *kvmapi.VCPU) error { _, err := fd.LAPIC(); return err })
	msrs := make([]kvmapi.MSREntry, len(m.msrs))
	for i, idx := range m.msrs {
		msrs[i].Index = idx
	}
	onVCPU("msrs", func(fd *kvmapi.VCPU) error { return fd.MSRs(msrs) })
	onVCPU("debugregs", func(fd *kvmapi.VCPU) error { _, err := fd.DebugRegs(); return err })
	onVCPU("events", func(fd *kvmapi.VCPU) error { _, err := fd.VCPUEvents(); return err })
	onVCPU("tsckhz", func(fd *kvmapi.VCPU) error { _, err := fd.TSCKHz(); return err })
	here("irqchip", func() error { _, err := m.saveIRQChip(); return err })
	here("clock", func() error { _, err := m.vm.Clock(); return err })
	here("devices", func() error {
		for _, d := range m.stateful {
			if _, err := d.SaveState(); err != nil {
				return err
			}
		}
		return nil
	})
	st, err := m.SaveState()
	if err != nil {
		b.Fatal(err)
	}
	here("marshal", func() error { _, err := st.MarshalBinary(); return err })
	here("total", func() error {
		st, err := m.SaveState()
		if err != nil {
			return err
		}
		_, err = st.MarshalBinary()
		return err
	})
	here("encodestate", func() error { _, err := m.EncodeState(); return err })
}

// BenchmarkEncodeState is BenchmarkSaveState through EncodeState, the
// checkpoint's path: the same machine, the same bytes.
func BenchmarkEncodeState(b *testing.B) {
	m := pausedCounter(b)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := m.EncodeState(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeState is what a standby does with each checkpoint's
// state before it acknowledges it (replicate's decodeState): decode the
// bytes EncodeState made, then check that this machine could resume them.
func BenchmarkDecodeState(b *testing.B) {
	m := pausedCounter(b)
	raw, err := m.EncodeState()
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var st MachineState
		if err := st.UnmarshalBinary(raw); err != nil {
			b.Fatal(err)
		}
		if err := m.CheckState(&st); err != nil {
			b.Fatal(err)
		}
	}
}

// pausedCounter starts a paused 1-vCPU tiny machine (the counter guest)
// for the state benchmarks; it closes when b ends.
func pausedCounter(b *testing.B) *Machine {
	b.Helper()
	kvmtest.Require(b)
	m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: tinyguest.Kernel(tinyguest.Counter(counterGPA)),
		Initrd: []byte("x"), Cmdline: "x", Console: &syncBuffer{}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	if err := m.Start(); err != nil {
		b.Fatal(err)
	}
	if err := m.Pause(); err != nil {
		b.Fatal(err)
	}
	return m
}
