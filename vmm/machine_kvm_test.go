package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"govmm/internal/kvmtest"
	"govmm/internal/tinyguest"
	"govmm/kvmapi"
	"govmm/vmm/guestmem"
)

// syncBuffer is a console sink safe for the UART's flush timer.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startTiny boots code at the 64-bit entry point on real KVM.
func startTiny(t *testing.T, cpus int, code []byte) (*Machine, *syncBuffer) {
	return startTinyWith(t, cpus, code, nil)
}

func startTinyWith(t *testing.T, cpus int, code []byte, before func(*Machine)) (*Machine, *syncBuffer) {
	t.Helper()
	kvmtest.Require(t)
	out := &syncBuffer{}
	m, err := New(Config{MemSize: 64 << 20, CPUs: cpus, Kernel: testKernel(code),
		Initrd: []byte("not really "), InitrdAppend: []byte("an initramfs"), Cmdline: DefaultCmdline, Console: out})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	if before != nil {
		before(m)
	}
	require.NoError(t, m.Start())
	return m, out
}

func waitResult(t *testing.T, m *Machine) (Result, error) {
	t.Helper()
	select {
	case <-m.Done():
	case <-time.After(60 * time.Second):
		m.Stop()
		t.Fatal("guest did not stop within 60s")
	}
	return m.Wait()
}

// The BSP enters the kernel in long mode with RSI at boot_params, whose
// setup header, command line pointer and e820 map are in guest memory; the
// guest's serial output reaches the console and its exit status the
// result.
func TestTinyGuestBootsAndExits(t *testing.T) {
	code := cat(
		// cmp rsi, bootParamsAddr; jne fail
		[]byte{0x48, 0x81, 0xfe, 0x00, 0x70, 0x00, 0x00}, []byte{0x75, 0x0c + 6},
		asmPrint("ok\n"), asmMovAL(42), asmExitAL,
		asmMovAL(99), asmExitAL, // fail:
	)
	// The jne skips "ok\n" (3*7 bytes) plus mov al + exit (2+6): fix up.
	skip := len(asmPrint("ok\n")) + 2 + len(asmExitAL)
	code[8] = byte(skip)
	m, out := startTiny(t, 1, code)
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, Result{Status: 42, Reason: "exit-port"}, res)
	require.Equal(t, "ok\n", out.String())

	bp, err := m.Memory().Slice(bootParamsAddr, bootParamsSize)
	require.NoError(t, err)
	require.Equal(t, "HdrS", string(bp[hdrMagic:hdrMagic+4]))
	require.Equal(t, uint32(cmdlineAddr), binary.LittleEndian.Uint32(bp[hdrCmdLinePtr:]))
	require.Equal(t, uint8(len(E820Map(64<<20))), bp[bpE820Entries])
	cl, err := m.Memory().Slice(cmdlineAddr, uint64(len(DefaultCmdline)+1))
	require.NoError(t, err)
	require.Equal(t, DefaultCmdline+"\x00", string(cl))
	initrd := binary.LittleEndian.Uint32(bp[hdrRamdiskImage:])
	require.Equal(t, uint32(23), binary.LittleEndian.Uint32(bp[hdrRamdiskSize:]), "Initrd and InitrdAppend: one initramfs")
	got, err := m.Memory().Slice(guestmem.GPA(initrd), 23)
	require.NoError(t, err)
	require.Equal(t, "not really an initramfs", string(got), "InitrdAppend right after Initrd")
}

// Pause stops every vCPU, including an AP that sits in KVM waiting for
// INIT/SIPI; memory does not change while paused; Resume lets the guest
// go on.
func TestPauseResume(t *testing.T) {
	const counter = 0x8000
	// loop: inc qword [counter]; jmp loop
	code := []byte{0x48, 0xff, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0xeb, 0xf6}
	m, _ := startTiny(t, 2, code)
	read := func() uint64 {
		b, err := m.Memory().Slice(counter, 8)
		require.NoError(t, err)
		return binary.LittleEndian.Uint64(b)
	}
	require.Eventually(t, func() bool { return read() > 0 }, 30*time.Second, time.Millisecond)

	for i := 0; i < 3; i++ {
		require.NoError(t, m.Pause())
		a := read()
		time.Sleep(50 * time.Millisecond) // the scenario: a vCPU that still ran would count meanwhile
		require.Equal(t, a, read(), "memory changed while paused")
		var states [2]uint32
		require.NoError(t, m.OnVCPUs(func(id int, fd *kvmapi.VCPU) error {
			s, err := fd.MPState()
			states[id] = s.State
			return err
		}))
		require.Equal(t, uint32(kvmapi.MPStateRunnable), states[0])
		require.Equal(t, uint32(kvmapi.MPStateUninitialized), states[1], "the AP waits for INIT/SIPI")
		require.NoError(t, m.Resume())
		require.Eventually(t, func() bool { return read() > a }, 30*time.Second, time.Millisecond)
	}
	require.ErrorIs(t, m.OnVCPUs(func(int, *kvmapi.VCPU) error { return nil }), ErrNotPaused)
	m.Stop()
	res, err := m.Wait()
	require.NoError(t, err)
	require.Equal(t, "stopped", res.Reason)
}

// A guest that pulses the i8042 reset line (Linux's reboot=k) ends the
// machine with status 0.
func TestI8042ResetStopsMachine(t *testing.T) {
	// mov al, 0xfe; out 0x64, al; hlt
	m, _ := startTiny(t, 1, []byte{0xb0, 0xfe, 0xe6, 0x64, 0xf4})
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, Result{Status: 0, Reason: "reset"}, res)
}

// A triple fault (ud2 with no IDT) is fatal and reported with registers.
func TestTripleFaultReportsRegisters(t *testing.T) {
	m, _ := startTiny(t, 1, []byte{0x0f, 0x0b})
	_, err := waitResult(t, m)
	var ve *VCPUError
	require.True(t, errors.As(err, &ve), "got %v", err)
	var ee *kvmapi.ExitError
	require.True(t, errors.As(err, &ee))
	require.Equal(t, kvmapi.ExitShutdown, ee.Reason)
	require.Contains(t, err.Error(), "rip=")
}

// Pausing a machine that has stopped says why it stopped: a fatal
// exit's error (a replicator's "initial sync: machine stopped" once said
// nothing more), or the reason of a clean end.
func TestPauseAfterStopSaysWhy(t *testing.T) {
	m, _ := startTiny(t, 1, []byte{0x0f, 0x0b}) // triple fault
	_, _ = waitResult(t, m)
	err := m.Pause()
	require.ErrorIs(t, err, ErrStopped)
	var ve *VCPUError
	require.True(t, errors.As(err, &ve), "got %v", err)
	assert.Contains(t, err.Error(), "rip=")

	m, _ = startTiny(t, 1, tinyguest.Exit(7))
	_, _ = waitResult(t, m)
	err = m.Pause()
	require.ErrorIs(t, err, ErrStopped)
	assert.EqualError(t, err, "machine stopped (exit-port)")
}

// Reads from an unclaimed MMIO address return all-ones and are counted.
func TestUnclaimedMMIOReadsOnes(t *testing.T) {
	code := cat(
		[]byte{0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0, 0, 0, 0}, // mov rbx, 0xd0000000
		[]byte{0x8b, 0x03}, // mov eax, [rbx]
		asmExitAL,
	)
	m, _ := startTiny(t, 1, code)
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, 0xff, res.Status)
	require.Equal(t, uint64(1), m.MMIOBus().Unclaimed.Load())
}

// The guest reaches the host bridge through configuration mechanism #1.
func TestPCIConfigFromGuest(t *testing.T) {
	code := cat(
		[]byte{0x66, 0xba, 0xf8, 0x0c},       // mov dx, 0xcf8
		[]byte{0xb8, 0x00, 0x00, 0x00, 0x80}, // mov eax, 0x80000000 (00:00.0 reg 0)
		[]byte{0xef},                         // out dx, eax
		[]byte{0x66, 0xba, 0xfc, 0x0c},       // mov dx, 0xcfc
		[]byte{0xed},                         // in eax, dx
		[]byte{0xc1, 0xe8, 0x08},             // shr eax, 8: low byte of vendor 0x8086 is 0x86, next 0x80
		asmExitAL,
	)
	m, _ := startTiny(t, 1, code)
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, 0x80, res.Status)
}

// The BSP starts the AP with INIT and SIPI through its local APIC, as
// Linux does from the MP table; the AP runs real-mode code at the SIPI
// vector.
func TestAPStartsOnSIPI(t *testing.T) {
	ap := []byte{0xb0, 0x07, 0xba, 0x00, 0x06, 0xee, 0xf4} // 16-bit: mov al,7; mov dx,0x600; out dx,al; hlt
	code := cat(
		[]byte{0x48, 0xbb, 0x00, 0x03, 0xe0, 0xfe, 0, 0, 0, 0}, // mov rbx, 0xfee00300 (ICR low)
		[]byte{0xc7, 0x43, 0x10, 0x00, 0x00, 0x00, 0x01},       // mov dword [rbx+0x10], 0x01000000 (dest APIC 1)
		[]byte{0xc7, 0x03, 0x00, 0x45, 0x00, 0x00},             // mov dword [rbx], 0x4500 (INIT, assert)
		[]byte{0xc7, 0x03, 0x01, 0x46, 0x00, 0x00},             // mov dword [rbx], 0x4601 (SIPI, vector 1 -> 0x1000)
		[]byte{0xeb, 0xfe}, // jmp $
	)
	m, _ := startTinyWith(t, 2, code, func(m *Machine) {
		require.NoError(t, m.Memory().WriteAt(ap, 0x1000))
	})
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, Result{Status: 7, Reason: "exit-port"}, res)
}

// A partial line the guest printed just before the exit port reaches the
// console by the time Wait returns: the VMM writes out everything the
// UART got before it reports the exit.
func TestConsoleFlushedAtExit(t *testing.T) {
	m, out := startTiny(t, 1, cat(asmPrint("partial line, no newline"), asmMovAL(3), asmExitAL))
	res, err := waitResult(t, m)
	require.NoError(t, err)
	require.Equal(t, 3, res.Status)
	require.Equal(t, "partial line, no newline", out.String())
}
