package vmm

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"govmm/kvmapi"
)

// requireCoalesced fails unless m queues latch-port writes (every KVM
// this project runs on has KVM_CAP_COALESCED_PIO, Linux 4.19 and later).
func requireCoalesced(t *testing.T, m *Machine) {
	t.Helper()
	on, _ := m.CoalescedPIO()
	if !on && m.vm.CheckExtension(kvmapi.CapCoalescedPIO) <= 0 {
		t.Skip("this KVM lacks KVM_CAP_COALESCED_PIO")
	}
	require.True(t, on, "KVM has KVM_CAP_COALESCED_PIO but the latch ports were not registered")
}

// PCI config reads through mechanism #1 cost one exit each, not two: the
// writes to 0xcf8 wait in KVM's ring, and each read of 0xcfc applies
// them first, in order (the last of two writes is the address read).
func TestCoalescedConfigAddressWrites(t *testing.T) {
	const iterations = 50
	body := cat(
		[]byte{0x66, 0xba, 0xf8, 0x0c},       // mov dx, 0xcf8
		[]byte{0xb8, 0x08, 0x00, 0x00, 0x80}, // mov eax, 0x80000008 (00:00.0 class register)
		[]byte{0xef},                         // out dx, eax
		[]byte{0xb8, 0x00, 0x00, 0x00, 0x80}, // mov eax, 0x80000000 (vendor/device)
		[]byte{0xef},                         // out dx, eax
		[]byte{0x66, 0xba, 0xfc, 0x0c},       // mov dx, 0xcfc
		[]byte{0xed},                         // in eax, dx: vendor/device
		[]byte{0x89, 0xc3},                   // mov ebx, eax
		[]byte{0x66, 0xba, 0xf8, 0x0c},       // mov dx, 0xcf8
		[]byte{0xb8, 0x00, 0x00, 0x00, 0x80}, // mov eax, 0x80000000
		[]byte{0xef},                         // out dx, eax
		[]byte{0xb8, 0x08, 0x00, 0x00, 0x80}, // mov eax, 0x80000008
		[]byte{0xef},                         // out dx, eax
		[]byte{0x66, 0xba, 0xfc, 0x0c},       // mov dx, 0xcfc
		[]byte{0xed},                         // in eax, dx: class code
	)
	code := cat(
		[]byte{0xb9, iterations, 0, 0, 0}, // mov ecx, iterations
		body,
		[]byte{0xe2, byte(-(len(body) + 2))}, // loop body
		[]byte{0xc1, 0xe8, 0x18},             // shr eax, 24: the class, 0x06 (bridge)
		[]byte{0xc1, 0xeb, 0x08},             // shr ebx, 8: 0x80 from vendor 0x8086
		[]byte{0x00, 0xd8},                   // add al, bl
		asmExitAL,
	)
	m, _ := startTiny(t, 1, code)
	requireCoalesced(t, m)
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, 0x80+0x06, res.Status, "each read saw the last address written before it")
	_, applied := m.CoalescedPIO()
	require.Equal(t, uint64(4*iterations), applied, "every write to 0xcf8 went through the ring")
	io := m.ExitCounts()[kvmapi.ExitIO]
	require.LessOrEqual(t, io, uint64(2*iterations+1), "the reads and the exit port exit; the writes do not")
	require.GreaterOrEqual(t, io, uint64(2*iterations+1))
}

// A write still in KVM's ring when the machine pauses is applied before
// the pause returns, so a saved state holds it: the guest below writes
// CONFIG_ADDRESS once, then only counts in memory (no exit to drain the
// ring for it).
func TestCoalescedWriteAppliedAtPause(t *testing.T) {
	const counter = 0x8000
	code := cat(
		[]byte{0x66, 0xba, 0xf8, 0x0c},       // mov dx, 0xcf8
		[]byte{0xb8, 0x34, 0x12, 0x00, 0x80}, // mov eax, 0x80001234
		[]byte{0xef},                         // out dx, eax
		// loop: inc qword [counter]; jmp loop
		[]byte{0x48, 0xff, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0xeb, 0xf6},
	)
	m, _ := startTiny(t, 1, code)
	requireCoalesced(t, m)
	read := func() uint64 {
		b, err := m.Memory().Slice(counter, 8)
		require.NoError(t, err)
		return binary.LittleEndian.Uint64(b)
	}
	require.Eventually(t, func() bool { return read() > 0 }, 30*time.Second, time.Millisecond)
	latch := func() uint32 {
		m.pci.mu.Lock()
		defer m.pci.mu.Unlock()
		return m.pci.addr
	}
	require.Zero(t, latch(), "the write waits in the ring while the guest runs without exits")
	require.NoError(t, m.Pause())
	require.Equal(t, uint32(0x80001234), latch(), "applied by the pause")
	_, applied := m.CoalescedPIO()
	require.Equal(t, uint64(1), applied)
	require.NoError(t, m.Resume())
	m.Stop()
	_, err := m.Wait()
	require.NoError(t, err)
}

// BenchmarkConfigRead is one PCI config read through mechanism #1 by a
// tiny guest: the address write (queued in KVM's ring) and the data read
// (an exit), against the same read after a write to the data port, which
// exits as every write did before the ring (two exits).
func BenchmarkConfigRead(b *testing.B) {
	for _, c := range []struct {
		name string
		port byte // low byte of the port written before each read: 0xf8 (0xcf8) or 0xfc (0xcfc)
	}{{"address-write-queued", 0xf8}, {"two-exits", 0xfc}} {
		b.Run(c.name, func(b *testing.B) {
			const reads = 20000
			body := cat(
				[]byte{0x66, 0xba, c.port, 0x0c},     // mov dx, port
				[]byte{0xb8, 0x00, 0x00, 0x00, 0x80}, // mov eax, 0x80000000
				[]byte{0xef},                         // out dx, eax
				[]byte{0x66, 0xba, 0xfc, 0x0c},       // mov dx, 0xcfc
				[]byte{0xed},                         // in eax, dx
			)
			code := cat(
				[]byte{0xb9, reads & 0xff, reads >> 8, 0, 0}, // mov ecx, reads
				body,
				[]byte{0xe2, byte(-(len(body) + 2))}, // loop body
				asmMovAL(0), asmExitAL,
			)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				m, err := New(Config{MemSize: 64 << 20, CPUs: 1, Kernel: testKernel(code), Initrd: []byte("x"), Cmdline: DefaultCmdline, Console: &syncBuffer{}})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				start := time.Now()
				if err := m.Start(); err != nil {
					b.Fatal(err)
				}
				<-m.Done()
				b.ReportMetric(float64(time.Since(start).Nanoseconds())/reads, "ns/read")
				b.StopTimer()
				m.Close()
				b.StartTimer()
			}
		})
	}
}
