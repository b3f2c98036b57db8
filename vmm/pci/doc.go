// Package pci owns the parts of PCI that every device shares and that
// device packages (virtio) may import without importing vmm: the type-0
// configuration space with BAR sizing and a capability list, an MSI-X table
// with its pending bits, and the interfaces between a device and the
// machine (Device, Host).
//
// The host bridge that answers configuration mechanism #1 (ports
// 0xcf8/0xcfc), assigns BAR addresses and maps BARs on the MMIO bus lives in
// vmm; it talks to devices only through Device.
//
// Invariant: configuration writes from the guest can change only the bits a
// device declared writable; BAR registers answer the sizing protocol
// (write all-ones, read back the size mask) and never hold an address that
// is not aligned to the BAR's size.
//
// Concurrency: ConfigSpace and MSIXTable guard their state with a mutex of
// their own. vCPU threads access them on guest config/BAR accesses; device
// goroutines read them to raise interrupts.
package pci
