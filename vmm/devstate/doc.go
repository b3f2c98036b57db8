// Package devstate owns the contract between a device and the machine
// state: the DeviceState record that every snapshot, migration and
// replication epoch carries for a device, the Stateful interface through
// which a device names itself (once: StateID, StateKind) and is stopped at
// a request boundary and saved, and the small binary layout devices use to
// encode their own Data. Codec walks a device's state struct in one order
// for both encoding and decoding, so that save and restore share one list
// of fields.
//
// Layout (little-endian throughout): fixed-width integers as they are;
// byte strings and strings as a uint32 length then the bytes; a bool as one
// byte 0 or 1. A device writes its fields in a fixed order under its own
// Version and reads them back in the same order; Decoder checks every length
// against what is left before allocating, and its error is sticky, so a
// device reads all fields then checks Err once.
//
// It is a leaf: vmm and virtio both import it, and it imports neither.
package devstate
