package pci

// Device is a PCI function. The host bridge forwards configuration cycles
// to Config and accesses inside a mapped BAR to ReadBAR/WriteBAR, with off
// relative to the BAR's base. Calls come from vCPU threads: never block.
type Device interface {
	Name() string
	Config() *ConfigSpace
	ReadBAR(bar int, off uint64, data []byte)
	WriteBAR(bar int, off uint64, data []byte)
}

// BARMapper is implemented by devices that need to know where their BARs
// are (e.g. to register ioeventfds at the notify address). The host bridge
// calls BARMapped after assigning a BAR and whenever the guest moves or
// enables it; addr is 0 when the BAR is unmapped (decoding disabled).
type BARMapper interface {
	BARMapped(bar int, addr uint64)
}

// ConfigObserver is implemented by devices that act on guest writes to
// their configuration space (MSI-X enable and function mask, INTx
// disable). The host bridge calls ConfigChanged after each such write.
type ConfigObserver interface {
	ConfigChanged()
}

// Host is what the machine offers PCI devices.
type Host interface {
	// SendMSI delivers one message-signalled interrupt.
	SendMSI(addr uint64, data uint32) error
	// AddIOEvent makes a guest write of size bytes at MMIO address addr
	// signal eventfd fd inside KVM, without a vCPU exit (KVM_IOEVENTFD).
	AddIOEvent(addr uint64, size uint32, fd int) error
	// RemoveIOEvent undoes AddIOEvent.
	RemoveIOEvent(addr uint64, size uint32, fd int) error
	// SetIRQLine drives a legacy INTx line (the GSI the host bridge wrote
	// into the device's Interrupt Line register) high or low. Devices use
	// it only when the guest has not enabled MSI-X.
	SetIRQLine(gsi uint32, level bool) error
}
