package vmm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"govmm/kvmapi"
	"govmm/vmm/devstate"
	"govmm/vmm/guestmem"
	"govmm/vmm/pci"
)

// BaseCmdline is what a guest needs to run under govmm: the console on
// COM1, reboot through the keyboard controller (which ends the VMM), no
// reboot loop on panic, and a quick i8042 probe.
const BaseCmdline = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd"

// TunedCmdline is what saves boot time on a govmm machine, each item
// measured with `govmm run --boot-trace` in the lab (docs/BOOT.md):
//
//   - pci=noearly: no early PCI scans (the AMD GART aperture check and
//     the early quirks read config space bus by bus: seconds of port I/O
//     exits there, and govmm has no such hardware);
//   - cryptomgr.notests: no self-tests of the kernel's crypto
//     algorithms at boot (half a second of an emulated boot's kernel
//     init, crypto_algapi_init, in the lab); booted with fips=1 the
//     kernel runs them anyway;
//   - quiet: kernel messages below KERN_ERR stay in the log, off the
//     console, whose every byte is an exit (20 KB at boot). The guest's
//     ready line and errors still show.
const TunedCmdline = "pci=noearly cryptomgr.notests quiet"

// DefaultCmdline is what every guest gets before the user's additions.
const DefaultCmdline = BaseCmdline + " " + TunedCmdline

// Config describes a machine to build.
type Config struct {
	MemSize uint64 // bytes of guest RAM
	CPUs    int
	Kernel  []byte // a bzImage, or a vmlinux (ELF) entered through PVH
	Initrd  []byte // an initramfs (may be several concatenated cpio archives)
	// InitrdAppend follows Initrd in guest memory: the guest's initramfs
	// is the two back to back (the kernel unpacks concatenated cpio
	// archives). A small archive joins a large, mapped Initrd this way
	// without a copy of it in the VMM's heap (govmm run's command mode).
	InitrdAppend []byte
	Cmdline      string
	Console      io.Writer // the UART's output; os.Stdout when nil

	// DirtyTracking is how KVM reports the pages vCPUs write while a
	// dirty tracker is open: DirtyBitmap (KVM_GET_DIRTY_LOG per slot at
	// each harvest), DirtyRing (a ring per vCPU, KVM_CAP_DIRTY_LOG_RING;
	// New fails with ErrNoDirtyRing when KVM lacks it) or DirtyAuto, the
	// default, which takes the bitmap: it harvests 1k to 64k dirty pages
	// about 3x faster than the ring on the hosts measured (govmm bench
	// checkpoint). Tracking is local: snapshots, migration and the
	// replication stream do not depend on it.
	DirtyTracking string
	// DirtyRingEntries sizes each vCPU's dirty ring (a power of two, at
	// least 256); 0 means DefaultDirtyRingEntries or KVM's limit.
	DirtyRingEntries int
}

// kvmDevice is the KVM system device every machine opens.
const kvmDevice = "/dev/kvm"

// MinMemory is the smallest guest the machine accepts.
const MinMemory = 32 << 20

// MaxCPUs bounds --cpus (the MP table must fit in the EBDA).
const MaxCPUs = 32

// Result says how a machine stopped.
type Result struct {
	Status int    // exit status for the command line (0 on poweroff/reboot)
	Reason string // "exit-port", "reset", "poweroff", "stopped"
}

// Machine is one VM: its memory, vCPUs, buses and legacy devices.
type Machine struct {
	cfg    Config
	procs  atomic.Int32 // vCPUs' worth of Ps held (procs.go) until Close
	sys    *kvmapi.System
	vm     *kvmapi.VM
	mem    *guestmem.Memory
	pio    *Bus
	mmio   *Bus
	pci    *PCIBus
	uart   *UART
	cpuid  []kvmapi.CPUIDEntry
	xsave  int    // bytes of XSAVE state per vCPU
	tscKHz uint32 // the TSC rate new vCPUs get here; 0 if KVM cannot tell before one exists
	// shaped is, per vCPU, what ShapeCPUID makes of cpuid and
	// tscControl whether KVM sets a vCPU's TSC rate: what checkState
	// compares a state with (a standby checks every checkpoint's), set
	// once by New and only read after.
	shaped     [][]kvmapi.CPUIDEntry
	tscControl bool
	// pvhEntry is the PVH entry point of an ELF kernel (set by load);
	// 0 boots a bzImage through its 64-bit entry.
	pvhEntry uint32
	// released is when Start let the vCPUs into KVM_RUN, loaded when it
	// had loaded the guest into memory (unix ns; the boot trace).
	released, loaded atomic.Int64
	// resumed is when the last vCPU left its latest pause for KVM_RUN
	// (ResumedAt), in Unix nanoseconds.
	resumed atomic.Int64
	// guestTSCKHz caches the guest's TSC rate as vCPU 0 reported it
	// (vcpuTSCKHz); 0 until read and after a restore.
	guestTSCKHz atomic.Uint32
	// syncRegs: KVM stores REGS, SREGS and VCPU_EVENTS in the kvm_run
	// page on request (KVM_CAP_SYNC_REGS), so a save reads them in one
	// KVM_RUN (kvmapi.VCPU.SyncedState).
	syncRegs bool
	// saver is what EncodeState keeps from one save to the next.
	saver stateSaver

	vcpus    []*vcpu
	msrs     []uint32 // MSRs saved and restored per vCPU (probed at start)
	stateful []statefulDev

	doneOnce sync.Once
	done     chan struct{} // closed when the machine stops
	result   Result
	err      error
	wg       sync.WaitGroup // vCPU goroutines

	restoring *MachineState // non-nil while StartFrom sets up vCPUs

	pauseMu     sync.Mutex // serialises Pause/Resume; guards paused, handedOver and devicesHeld
	paused      int        // pause holders: Pause increments, Resume decrements
	handedOver  bool       // the guest lives on elsewhere: never run again (HandOver)
	devicesHeld bool       // StartFromPaused: devices stay quiesced until the vCPUs run

	stwMu sync.Mutex // one stop-the-world operation at a time (WithPaused)

	// spin is how long a paused vCPU polls for its next request, and a
	// cut for the vCPUs' answers, before sleeping (pauseSpin); 0: never.
	// Set in New, read-only after.
	spin time.Duration

	// pauseHelper, when set (SetPauseHelper), runs between a pause's
	// looks for the vCPUs' answers to its kick.
	pauseHelper atomic.Pointer[func()]

	coal coalescer // KVM's queue of writes to latch ports (coalesced.go)

	tracking atomic.Bool // a dirty tracker is open (TrackDirty)
	ring     dirtyRings  // the vCPUs' dirty rings, when DirtyTracking() is DirtyRing
}

// New opens KVM and builds the machine: memory slots, interrupt
// controllers, PIT, buses and legacy devices. It does not load the kernel
// or start vCPUs (Start does), so PCI devices can be added in between.
func New(cfg Config) (*Machine, error) {
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return nil, fmt.Errorf("cpus %d out of range 1..%d", cfg.CPUs, MaxCPUs)
	}
	if cfg.MemSize < MinMemory {
		return nil, fmt.Errorf("memory %d MiB is below the minimum of %d MiB", cfg.MemSize>>20, MinMemory>>20)
	}
	if cfg.MemSize%(2<<20) != 0 {
		return nil, fmt.Errorf("memory %d bytes is not a multiple of 2 MiB", cfg.MemSize)
	}
	if total, err := hostMemory(); err == nil && cfg.MemSize > total {
		return nil, fmt.Errorf("memory %d MiB is more than the host has (%d MiB)", cfg.MemSize>>20, total>>20)
	}
	if err := checkDirtyConfig(&cfg); err != nil {
		return nil, err
	}
	if cfg.Console == nil {
		cfg.Console = os.Stdout
	}
	m := &Machine{cfg: cfg, done: make(chan struct{}), pio: NewBus("pio"), mmio: NewBus("mmio")}
	if err := m.build(); err != nil {
		m.Close()
		return nil, err
	}
	m.spin = pauseSpin(cfg.CPUs)
	if holdProcs(cfg.CPUs) {
		m.procs.Store(int32(cfg.CPUs))
	}
	return m, nil
}

func (m *Machine) build() error {
	sys, err := kvmapi.Open(kvmDevice)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w (is KVM enabled? load kvm_intel or kvm_amd)", err)
	case errors.Is(err, os.ErrPermission):
		return fmt.Errorf("%w (add yourself to the kvm group, or run as root)", err)
	case err != nil:
		return fmt.Errorf("%s: %w", kvmDevice, err)
	}
	m.sys = sys
	for _, c := range []struct {
		cap  int
		name string
	}{
		{kvmapi.CapIRQChip, "irqchip"}, {kvmapi.CapUserMemory, "user memory"},
		{kvmapi.CapSetTSSAddr, "set_tss_addr"}, {kvmapi.CapPIT2, "pit2"},
		{kvmapi.CapImmediateExit, "immediate_exit"}, {kvmapi.CapSignalMSI, "signal_msi"},
		{kvmapi.CapIOEventFD, "ioeventfd"}, {kvmapi.CapExtCPUID, "ext_cpuid"},
	} {
		if sys.CheckExtension(c.cap) <= 0 {
			return fmt.Errorf("%s: kvm lacks %s", kvmDevice, c.name)
		}
	}
	if max := sys.CheckExtension(kvmapi.CapMaxVCPUs); max > 0 && m.cfg.CPUs > max {
		return fmt.Errorf("cpus %d exceeds kvm's limit of %d", m.cfg.CPUs, max)
	}
	m.xsave = kvmapi.XsaveSize
	if n := sys.CheckExtension(kvmapi.CapXsave2); n > m.xsave {
		m.xsave = n
	}
	m.syncRegs = sys.CheckExtension(kvmapi.CapSyncRegs)&kvmapi.SyncX86State == kvmapi.SyncX86State
	if m.cpuid, err = sys.SupportedCPUID(); err != nil {
		return fmt.Errorf("get supported cpuid: %w", err)
	}
	if sys.CheckExtension(kvmapi.CapTSCDeadlineTimer) > 0 {
		addTSCDeadline(m.cpuid)
	}
	for id := range m.cfg.CPUs {
		m.shaped = append(m.shaped, ShapeCPUID(m.cpuid, id, m.cfg.CPUs))
	}
	m.tscControl = sys.CheckExtension(kvmapi.CapTSCControl) > 0
	if m.msrs, err = sys.MSRIndexList(); err != nil {
		return fmt.Errorf("get msr index list: %w", err)
	}
	if m.vm, err = sys.CreateVM(); err != nil {
		return fmt.Errorf("create vm: %w", err)
	}
	if err := hidePMU(sys, m.vm); err != nil {
		return err
	}
	if err := m.setupDirtyTracking(); err != nil {
		return err
	}
	if khz, err := m.vm.TSCKHz(); err == nil {
		m.tscKHz = khz
	}
	var specs []guestmem.Spec
	for _, r := range RAMLayout(m.cfg.MemSize) {
		specs = append(specs, guestmem.Spec{GPA: guestmem.GPA(r.GPA), Size: r.Size})
	}
	if m.mem, err = guestmem.New(specs); err != nil {
		return fmt.Errorf("allocate %d MiB of guest memory: %w", m.cfg.MemSize>>20, err)
	}
	for _, r := range m.mem.Regions() {
		if err := m.setSlot(r, 0); err != nil {
			return fmt.Errorf("memory slot %d: %w", r.Slot, err)
		}
	}
	if err := m.vm.SetTSSAddr(tssAddr); err != nil {
		return fmt.Errorf("set tss address: %w", err)
	}
	if err := m.vm.SetIdentityMapAddr(identMapAddr); err != nil {
		return fmt.Errorf("set identity map address: %w", err)
	}
	if err := m.vm.CreateIRQChip(); err != nil {
		return fmt.Errorf("create irqchip: %w", err)
	}
	if err := m.vm.CreatePIT2(kvmapi.PITSpeakerDummy); err != nil {
		return fmt.Errorf("create pit: %w", err)
	}
	m.setupCoalescedPIO()

	return m.addLegacyDevices()
}

// addLegacyDevices puts the UART, the i8042, the RTC, the exit port and
// the PCI host bridge on the PIO bus; the first three are part of the
// machine state.
func (m *Machine) addLegacyDevices() error {
	var err error
	m.uart = NewUART(m.cfg.Console, func(level bool) { _ = m.vm.IRQLine(COM1IRQ, level) })
	i8042 := NewI8042(func() { m.finish(Result{Status: 0, Reason: "reset"}, nil) })
	rtc := NewRTC(nil)
	for _, d := range []devstate.Stateful{m.uart, i8042, rtc} {
		if err := m.AddStateful(d); err != nil {
			return err
		}
	}
	if m.pci, err = NewPCIBus(m.mmio); err != nil {
		return err
	}
	for _, r := range []struct {
		base, size uint64
		dev        Device
	}{
		{COM1Base, 8, m.uart},
		{I8042Base, 1, i8042},
		{I8042Base + 4, 1, offsetDevice{i8042, 4}},
		{RTCBase, RTCSize, rtc},
		{ExitPortBase, 1, &ExitPort{exit: func(s int) { m.finish(Result{Status: s, Reason: "exit-port"}, nil) }}},
		{PCIConfigBase, PCIConfigSize, m.pci},
	} {
		if err := m.pio.Register(r.base, r.size, r.dev); err != nil {
			return err
		}
	}
	return nil
}

// ecxTSCDeadline is CPUID.01H:ECX.TSC_DEADLINE (bit 24).
const ecxTSCDeadline = 1 << 24

// addTSCDeadline offers the LAPIC's TSC-deadline timer mode. KVM emulates
// it with any in-kernel LAPIC and says so with KVM_CAP_TSC_DEADLINE_TIMER,
// but kernels before 6.2 or so leave the bit out of
// KVM_GET_SUPPORTED_CPUID (QEMU adds it the same way). It matters for
// replication: without it Linux calibrates the LAPIC timer against the
// PIT at boot, and a boot slowed by checkpoint pauses can fail the check
// ("APIC timer disabled due to verification failure") and leave the guest
// ticking on the PIT for good; with it there is nothing to calibrate.
func addTSCDeadline(cpuid []kvmapi.CPUIDEntry) {
	for i := range cpuid {
		if cpuid[i].Function == 1 {
			cpuid[i].ECX |= ecxTSCDeadline
		}
	}
}

// statefulDev is a device that is part of every checkpoint, with the ID
// and kind it gave when it was added.
type statefulDev struct {
	devstate.Stateful
	id, kind string
}

// AddStateful makes a device part of the machine state, under the ID and
// kind it names itself with.
func (m *Machine) AddStateful(d devstate.Stateful) error {
	id := d.StateID()
	for _, e := range m.stateful {
		if e.id == id {
			return fmt.Errorf("device id %q used twice", id)
		}
	}
	m.stateful = append(m.stateful, statefulDev{d, id, d.StateKind()})
	return nil
}

// offsetDevice registers one device at a second, non-adjacent range.
type offsetDevice struct {
	Device
	add uint64
}

func (o offsetDevice) Read(off uint64, data []byte)  { o.Device.Read(off+o.add, data) }
func (o offsetDevice) Write(off uint64, data []byte) { o.Device.Write(off+o.add, data) }

// HostMemory is the host's memory (MemTotal in /proc/meminfo): New
// refuses a guest larger than that, and govmm run says so before it
// loads anything.
func HostMemory() (uint64, error) { return hostMemory() }

// hostMemory reads MemTotal from /proc/meminfo.
func hostMemory() (uint64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "MemTotal:" {
			kb, err := strconv.ParseUint(fields[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no MemTotal in /proc/meminfo")
}

// Memory is the guest's RAM.
func (m *Machine) Memory() *guestmem.Memory { return m.mem }

// UART is the console.
func (m *Machine) UART() *UART { return m.uart }

// PIOBus and MMIOBus expose the buses (for stats and tests).
func (m *Machine) PIOBus() *Bus  { return m.pio }
func (m *Machine) MMIOBus() *Bus { return m.mmio }

// AddPCIDevice attaches dev to bus 0 and, when it has state, makes it
// part of the machine state. Call before Start.
func (m *Machine) AddPCIDevice(dev pci.Device) error {
	if s, ok := dev.(devstate.Stateful); ok {
		if err := m.AddStateful(s); err != nil {
			return err
		}
	}
	_, _, err := m.pci.Add(dev)
	return err
}

var _ pci.Host = (*Machine)(nil)

// SendMSI implements pci.Host.
func (m *Machine) SendMSI(addr uint64, data uint32) error { return m.vm.SignalMSI(addr, data) }

// AddIOEvent implements pci.Host.
func (m *Machine) AddIOEvent(addr uint64, size uint32, fd int) error {
	return m.vm.IOEventFD(kvmapi.IOEventFD{Addr: addr, Len: size, FD: fd})
}

// RemoveIOEvent implements pci.Host.
func (m *Machine) RemoveIOEvent(addr uint64, size uint32, fd int) error {
	return m.vm.DeassignIOEventFD(kvmapi.IOEventFD{Addr: addr, Len: size, FD: fd})
}

// SetIRQLine implements pci.Host.
func (m *Machine) SetIRQLine(gsi uint32, level bool) error { return m.vm.IRQLine(gsi, level) }

// load puts the kernel, initramfs, command line, boot_params, page tables,
// GDT and MP table into guest memory.
// initrdSize is the initramfs's size in guest memory: Initrd and
// InitrdAppend.
func (m *Machine) initrdSize() uint64 {
	return uint64(len(m.cfg.Initrd)) + uint64(len(m.cfg.InitrdAppend))
}

func (m *Machine) load() error {
	if IsELF(m.cfg.Kernel) {
		k, err := ParseELFKernel(m.cfg.Kernel)
		if err != nil {
			return err
		}
		m.pvhEntry, err = m.loadPVH(k)
		return err
	}
	k, err := ParseBzImage(m.cfg.Kernel)
	if err != nil {
		return err
	}
	cmdline := m.cfg.Cmdline
	if uint32(len(cmdline)) > k.CmdlineSize || len(cmdline) >= cmdlineMax {
		return fmt.Errorf("kernel command line is %d bytes, the kernel takes at most %d", len(cmdline), min(k.CmdlineSize, cmdlineMax-1))
	}
	var initrdAddr uint64
	initrdSize := m.initrdSize()
	if initrdSize > 0 {
		if initrdAddr, err = InitrdPlacement(k, m.cfg.MemSize, initrdSize); err != nil {
			return err
		}
	}
	if uint64(kernelStart+len(k.Payload)) > lowRAMEnd(m.cfg.MemSize) {
		return fmt.Errorf("memory too small for a %d MiB kernel", len(k.Payload)>>20)
	}
	bp, err := BootParams(k, cmdlineAddr, initrdAddr, initrdSize, E820Map(m.cfg.MemSize))
	if err != nil {
		return err
	}
	mp, err := MPTable(ebdaStart, m.cfg.CPUs, m.pci.IRQs())
	if err != nil {
		return err
	}
	writes := []struct {
		what string
		gpa  uint64
		data []byte
	}{
		{"kernel", kernelStart, k.Payload},
		{"initramfs", initrdAddr, m.cfg.Initrd},
		{"initramfs's appended part", initrdAddr + uint64(len(m.cfg.Initrd)), m.cfg.InitrdAppend},
		{"command line", cmdlineAddr, append([]byte(cmdline), 0)},
		{"boot params", bootParamsAddr, bp},
		{"mp table", ebdaStart, mp},
		{"gdt", gdtAddr, bootGDT()},
		{"page tables", pml4Addr, identityPageTables()},
	}
	for _, w := range writes {
		if len(w.data) == 0 {
			continue
		}
		if err := m.mem.WriteAt(w.data, guestmem.GPA(w.gpa)); err != nil {
			return fmt.Errorf("load %s at %#x: %w", w.what, w.gpa, err)
		}
	}
	return nil
}

// bootGDT is the GDT the 64-bit boot protocol asks for: flat code at
// selector 0x10 (__BOOT_CS), flat data at 0x18 (__BOOT_DS), and a TSS at
// 0x20 so that TR is valid.
func bootGDT() []byte {
	entries := []uint64{
		0, 0,
		gdtEntry(0xa09b, 0, 0xfffff), // code: present, exec/read, long mode, 4 KiB granularity
		gdtEntry(0xc093, 0, 0xfffff), // data: present, read/write, 32-bit, 4 KiB granularity
		gdtEntry(0x808b, 0, 0xfffff), // 64-bit TSS (busy)
	}
	var b bytes.Buffer
	for _, e := range entries {
		var x [8]byte
		for i := range x {
			x[i] = byte(e >> (8 * i))
		}
		b.Write(x[:])
	}
	return b.Bytes()
}

// gdtEntry packs a segment descriptor from the access/flags word
// (flags<<12 | access), base and limit.
func gdtEntry(flags uint16, base, limit uint32) uint64 {
	return uint64(base&0xff000000)<<32 | uint64(flags&0xf0ff)<<40 |
		uint64(limit&0xf0000)<<32 | uint64(base&0xffffff)<<16 | uint64(limit&0xffff)
}

// identityPageTables maps the first 4 GiB 1:1 with 2 MiB pages: a PML4,
// a PDPT and four page directories, laid out from pml4Addr.
func identityPageTables() []byte {
	const n = 6 * 4096
	b := make([]byte, n)
	put := func(off int, v uint64) {
		for i := 0; i < 8; i++ {
			b[off+i] = byte(v >> (8 * i))
		}
	}
	const present, rw, huge = 1, 2, 0x80
	put(0, pdptAddr|present|rw)
	for i := 0; i < 4; i++ {
		put(pdptAddr-pml4Addr+8*i, uint64(pdAddr+i*4096)|present|rw)
		for j := 0; j < 512; j++ {
			put(pdAddr-pml4Addr+i*4096+8*j, uint64(i*512+j)<<21|present|rw|huge)
		}
	}
	return b
}
