// Package container owns govmm's one binary format: the sectioned
// container that machine states (GOVMMSTA), snapshot files (GOVMMSNP)
// and the replication stream's checkpoints (GOVMMCKP) are made of, and
// the layouts of the sections they share: pages and disk writes. A page
// section is laid out the same in a snapshot file and in a stream's Pages
// frame, so one decoder (ParsePages) serves both. docs/FORMATS.md is the
// reference for every byte.
//
// A container is a 12-byte header (magic, version, flags), then typed
// sections (type, flags, length, payload), then an end section holding
// the CRC32C of every byte before it:
//
//	magic [8] | version u16 | flags u16 (0)
//	type u16 | flags u16 (0) | length u32 | payload [length]   ... repeated
//	type 1 (end) | 0 u16 | 4 u32 | crc32c u32
//
// It owns the header, the section framing, the checksum rule (Checksum),
// the typed errors, the section type numbers of every kind (one registry,
// so a number means one thing everywhere), and the page and disk section
// layouts. It does not own what a machine state's sections hold (package
// vmm walks them with devstate.Codec), nor how a stream cuts a
// checkpoint into frames (replicate/stream).
//
// # Invariants
//
//   - No allocation before a cap: a reader checks every section's length
//     against the cap its caller gave for that type (and, in memory,
//     against what is left) before it reads or allocates the payload.
//   - Nothing unverified from Parse: it verifies the checksum before it
//     returns a single section. Reader streams multi-GB files section by
//     section and verifies the checksum only at the end section: its
//     callers act on no payload irreversibly before Next returns io.EOF
//     (the snapshot reader fills a new machine's memory, which is
//     discarded on any error).
//   - Every refusal wraps one of ErrNotContainer, ErrVersion, ErrFormat,
//     ErrTruncated, ErrChecksum or ErrTooLarge.
//
// It is a leaf: vmm and replicate/stream import it, it imports nothing of
// govmm. Its values are used by one goroutine at a time.
package container
