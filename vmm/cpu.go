package vmm

import (
	"encoding/binary"
	"fmt"

	"govmm/kvmapi"
)

// MSRs set on every vCPU at boot, as firmware would leave them.
const (
	msrSysenterCS   = 0x174
	msrSysenterESP  = 0x175
	msrSysenterEIP  = 0x176
	msrStar         = 0xc0000081
	msrLStar        = 0xc0000082
	msrCStar        = 0xc0000083
	msrSyscallMask  = 0xc0000084
	msrKernelGSBase = 0xc0000102
	msrMiscEnable   = 0x1a0
	msrMTRRDefType  = 0x2ff

	miscEnableFastString = 1
	mtrrEnable           = 1 << 11
	mtrrTypeWB           = 6
)

// LAPIC local vector table registers and delivery modes.
const (
	apicLVT0       = 0x350
	apicLVT1       = 0x360
	apicModeNMI    = 0x4
	apicModeExtINT = 0x7
)

// Control register and EFER bits for long mode.
const (
	cr0PE   = 1 << 0
	cr0ET   = 1 << 4
	cr0NE   = 1 << 5
	cr0PG   = 1 << 31
	cr4PAE  = 1 << 5
	eferLME = 1 << 8
	eferLMA = 1 << 10

	bootCS  = 0x10
	bootDS  = 0x18
	bootTR  = 0x20
	bootRSP = 0x8ff0
)

// configure sets CPUID, MSRs and the LAPIC on every vCPU, and the 64-bit
// entry state on the bootstrap processor. APs wait for INIT/SIPI inside
// KVM.
func (c *vcpu) configure() error {
	// A restored guest gets the CPUID it booted with (checkState made
	// sure this host offers it).
	cpuid := ShapeCPUID(c.m.cpuid, c.id, c.m.cfg.CPUs)
	if st := c.m.restoring; st != nil && len(st.VCPUs[c.id].CPUID) > 0 {
		cpuid = st.VCPUs[c.id].CPUID
	}
	if err := c.fd.SetCPUID2(cpuid); err != nil {
		return fmt.Errorf("set cpuid: %w", err)
	}
	c.cpuid = cpuid
	if c.id == 0 {
		c.m.msrs = probeMSRs(c.fd, c.m.msrs)
	}
	if st := c.m.restoring; st != nil {
		c.m.guestTSCKHz.Store(0) // restoreVCPU may set another rate
		return restoreVCPU(c.fd, &st.VCPUs[c.id], st.TSCKHz, c.m.xsave)
	}
	msrs := []kvmapi.MSREntry{
		{Index: msrSysenterCS}, {Index: msrSysenterESP}, {Index: msrSysenterEIP},
		{Index: msrStar}, {Index: msrLStar}, {Index: msrCStar}, {Index: msrSyscallMask},
		{Index: msrKernelGSBase},
		{Index: msrMiscEnable, Data: miscEnableFastString},
		{Index: msrMTRRDefType, Data: mtrrEnable | mtrrTypeWB},
	}
	if err := c.fd.SetMSRs(msrs); err != nil {
		return fmt.Errorf("set boot msrs: %w", err)
	}
	lapic, err := c.fd.LAPIC()
	if err != nil {
		return fmt.Errorf("get lapic: %w", err)
	}
	setLVTMode(&lapic, apicLVT0, apicModeExtINT)
	setLVTMode(&lapic, apicLVT1, apicModeNMI)
	if err := c.fd.SetLAPIC(lapic); err != nil {
		return fmt.Errorf("set lapic: %w", err)
	}
	if c.id != 0 {
		return nil
	}
	if c.m.pvhEntry != 0 {
		return c.pvhBootState(c.m.pvhEntry)
	}
	return c.bootState()
}

func setLVTMode(l *kvmapi.LAPICState, reg int, mode uint32) {
	v := binary.LittleEndian.Uint32(l.Regs[reg:])
	v = v&^0x700 | mode<<8
	binary.LittleEndian.PutUint32(l.Regs[reg:], v)
}

// flatSegments loads s with the boot GDT's flat 4 GiB code and data
// segments and an empty IDT: a 64-bit code segment when long, else a
// 32-bit one (the PVH entry). The task register is the caller's.
func flatSegments(s *kvmapi.Sregs, long bool) {
	code := kvmapi.Segment{Base: 0, Limit: 0xffffffff, Selector: bootCS, Type: 0xb, Present: 1, S: 1, G: 1}
	if long {
		code.L = 1
	} else {
		code.DB = 1
	}
	data := kvmapi.Segment{Base: 0, Limit: 0xffffffff, Selector: bootDS, Type: 0x3,
		Present: 1, S: 1, DB: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.GDT = kvmapi.DTable{Base: gdtAddr, Limit: 5*8 - 1}
	s.IDT = kvmapi.DTable{Base: 0, Limit: 0}
}

// bootState puts the BSP at the kernel's 64-bit entry point: long mode
// with identity paging, the boot GDT loaded, RSI pointing at boot_params.
func (c *vcpu) bootState() error {
	s, err := c.fd.Sregs()
	if err != nil {
		return fmt.Errorf("get sregs: %w", err)
	}
	flatSegments(&s, true)
	s.TR = kvmapi.Segment{Base: 0, Limit: 0xfffff, Selector: bootTR, Type: 0xb, Present: 1}
	s.CR0 = cr0PE | cr0ET | cr0NE | cr0PG
	s.CR3 = pml4Addr
	s.CR4 = cr4PAE
	s.EFER = eferLME | eferLMA
	if err := c.fd.SetSregs(s); err != nil {
		return fmt.Errorf("set long-mode sregs: %w", err)
	}
	if err := c.fd.SetFPU(kvmapi.FPU{FCW: 0x37f, MXCSR: 0x1f80}); err != nil {
		return fmt.Errorf("set fpu: %w", err)
	}
	if err := c.fd.SetRegs(kvmapi.Regs{
		RIP:    kernelStart + 0x200, // the 64-bit entry point
		RSI:    bootParamsAddr,
		RSP:    bootRSP,
		RFLAGS: 2,
	}); err != nil {
		return fmt.Errorf("set regs: %w", err)
	}
	return nil
}

// probeMSRs keeps the MSRs of KVM's index list that this vCPU can read
// and write back: those are what a machine state carries.
func probeMSRs(fd *kvmapi.VCPU, list []uint32) []uint32 {
	var ok []uint32
	for _, idx := range list {
		e := []kvmapi.MSREntry{{Index: idx}}
		if fd.MSRs(e) != nil || fd.SetMSRs(e) != nil {
			continue
		}
		ok = append(ok, idx)
	}
	return ok
}
