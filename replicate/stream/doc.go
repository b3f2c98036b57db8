// Package stream is the replication wire protocol: one authenticated TCP
// connection from a primary (or migration source) to its standby (or
// destination) carrying a handshake, then checkpoints made of frames, with
// acks, heartbeats and errors coming back on the same connection. Live
// migration is the same stream ended by a final checkpoint and a handover.
// docs/STREAM.md has the sequence diagram, the receiver's state machine and
// the version policy.
//
// It owns framing, authentication, the hard caps on every field,
// checkpoint verification (counts, lengths, a checksum), the commit/abort
// protocol toward a PageSink and a DiskSink, and liveness: heartbeats, the
// failure detector, write deadlines, and the failover timeout the two ends
// agree on. It does not own epochs, dirty tracking, output buffering or
// failover policy (package replicate builds those on Sender and
// Receiver), nor the machine state's encoding, which it carries as opaque
// bytes, nor the layout of a checkpoint's content: a checkpoint is a
// GOVMMCKP container (package container, docs/FORMATS.md) cut into
// frames, whose page and disk sections package container encodes and
// decodes, for this stream and for snapshot files alike.
//
// # Invariants
//
//   - Atomic checkpoints (DESIGN.md invariant 2): the receiver stages a
//     checkpoint and commits it only after its EndCheckpoint verifies and
//     Config.OnCommit accepts it; any failure aborts the staging, and the
//     ack for epoch N is sent only after N is committed. Acks arrive in
//     order. A StagingSink's copy of a committed checkpoint into memory
//     runs after the ack (the standby holds all of it, staged, and nothing
//     the stream sends can stop it); Run waits for it before it commits
//     the next checkpoint (a large one's copy runs while the next is
//     staged: receiver.go, overlapPages) and before it returns, so
//     checkpoints reach memory in order and nothing resumes from memory
//     that holds part of one.
//   - Slow is not dead (invariant 9): every byte received is life; each
//     end beats from a goroutine of its own and counts silence only while
//     its reader listens, never while it applies, syncs or is itself
//     stalled; the detector never waits behind a write. See endpoint.
//   - No trust (invariant 6): every length is checked against its cap
//     before allocation; every page address is page-aligned and inside the
//     sender's announced layout; after the handshake every frame's payload
//     is sealed with the session's cipher (AEGIS-128X2 or AEGIS-128L where
//     both ends' CPUs run it, else AES-256-GCM) under a per-session,
//     per-direction key,
//     with its header (which holds a sequence number, also the nonce) as
//     additional data, so frames cannot be read, forged, replayed,
//     reordered or dropped; the handshake proves knowledge of the
//     pre-shared key both ways. (Without a key, loopback only, frames
//     carry CRC32Cs instead: corruption is caught, nothing else.)
//
// # Wire format (version 17, little-endian)
//
// Handshake frames (each side's Hello and Auth, framed as in version 1 so
// that any version can read a hello far enough to refuse it):
//
//	length u32 | type u8 | 0 u8 | 0 u16 | seq u64 | payload [length] | mac [32]
//
// Every later frame (session frames):
//
//	length u32 | type u8 | 0 u8 | 0 u16 | seq u64 | ciphertext [length] | tag [16]
//
// or, for a Pages frame sealed in parts (version 15; split > 0, parts > 0):
//
//	length u32 | type u8 | split u16 | parts u8 | seq u64 |
//	ciphertext [split] | tag [16] | parts × (ciphertext [run] | tag [16])
//
// or, in a session without a key (Config.Insecure):
//
//	length u32 | type u8 | 0 u8 | 0 u16 | seq u64 | payload [length] | crc32c [4]
//
// length ≤ MaxFramePayload (checked before anything is read or allocated)
// is the plaintext payload's length; seq counts frames from 0 in each
// direction. A handshake frame's mac is HMAC-SHA256 over the 16 header
// bytes and the payload under a public key (the proofs authenticate those
// frames). After its Auth frame each side switches to its direction's
// session key: ciphertext and tag are the session's cipher sealing the
// payload, with nonce 0 [4] | seq u64 (AEGIS's 16-byte nonce: then
// 0 [4]) and the 16 header bytes as additional data. The cipher is
// AEGIS-128X2 (RFC 10032 section 5, 128-bit tag) when both hellos set
// flag bit 5 (version 17), else AEGIS-128L (RFC 10032, 128-bit tag) when
// both set flag bit 4 (version 16), else AES-256-GCM.
// A Pages frame of pages sent from where they lie (SendStablePage,
// SendSummedPage) is sealed in parts, so that AES-GCM reads the pages in
// place instead of a copy: its payload is a stored, grouped section, and
// part 0 is its first split bytes (the Pages header and the section up
// to its data), then each maximal run of entries with data (pages
// between zero pages) is a part, in order, their lengths as the entries
// give them (sealedParts); part number i is sealed with nonce
// i u32 | seq u64 (part 0's is the frame's nonce) and the same header
// as additional data, and the receiver opens each part where its
// plaintext belongs in the payload.
// Without a key there is nothing to seal with: the payload stays in clear
// and crc32c is the CRC32C (Castagnoli) of the 16 header bytes and the
// payload, but only of the header for a Pages, Disk or State frame,
// whose payload is a checkpoint section that the End frame's checksum
// covers (nothing of a checkpoint is applied before it verifies); a
// mismatch is ErrAuth, like a bad tag.
// Payloads (plaintext) by type:
//
//	1 Hello     "GOVMMSTR" | version u16 | flags u16 (bit 0: keyed; bits 1, 2: codecs s2,
//	            zstd: the one a sender wants, those a receiver accepts; bit 3:
//	            deltas, on when both set it; bits 4, 5, keyed only: this end seals
//	            with AEGIS-128L, AEGIS-128X2, the session's cipher when both set
//	            it, bit 5 first) | role u8
//	            (1 sender, 2 receiver) | 0 [3] | nonce [32] |
//	            heartbeat ns u64 | failover timeout ns u64 (0 < 2×heartbeat ≤ timeout ≤ 10 min) |
//	            name (u16 len, ≤256) | vcpus u32 | nregions u16 (≤64) | 0 u16 |
//	            nregions × (gpa u64, size u64) |
//	            ndevices u16 (≤64) | ndevices × (id (u16 len, ≤64) | nattrs u16 (≤16) |
//	            nattrs × (key (u16 len, ≤32) | value (u16 len, ≤256))) |
//	            witness generation u64 (0: no witness) | holder (u16 len, ≤256; empty at generation 0)
//	2 Auth      proof [32]
//	3 Begin     epoch u64 (>0, increasing) | kind u8 (1 initial-sync, 2 epoch, 3 final) | 0 [7]
//	4 Pages     codec u8 (0 stored, 1 s2, 2 zstd) | 0 [3] | length u32 (≤ the largest
//	            page section) | data: a container page section's payload of
//	            length bytes (1..256 pages, each gpa inside the layout; its
//	            entries' headers first where flag SectionGrouped is set,
//	            version 14), as is (stored) or compressed with the session's codec
//	5 State     codec u8 | base u8 | 0 [2] | length u32 (1..MaxStateChunk) | data:
//	            a container state section's payload of length bytes of machine
//	            state (the checkpoint's State frames concatenated, ≤ MaxState in
//	            all), base 0 as they are, base 1 XORed with the state of the last
//	            checkpoint that carried state, at the same offsets (bytes past its
//	            end as they are), stored or compressed as a Pages frame's
//	            (version 13; a sender XORs only to compress)
//	6 End       epoch u64 | pages u64 | state length u64 | disk bytes u64 | sum u64
//	7 Ack       epoch u64
//	8 Heartbeat sender's clock, unix ns, u64
//	9 Error     code u16 | len u16 (≤1024) | message
//	10 Goodbye  empty: the sender ends the stream on purpose (also inside a
//	            checkpoint, which is then aborted; after a final checkpoint,
//	            the migration is aborted)
//	11 Disk     codec u8 | 0 [3] | length u32 (≤ MaxDiskPayload) | data: a container
//	            disk section's payload of length bytes, one write or zero run of
//	            1..MaxDiskChunk bytes on disk < MaxDisks, stored or compressed as
//	            a Pages frame's (version 12; a zero run always stored)
//	12 Accept   empty: the receiver serves this sender (after Verify)
//	13 Handover empty: after the final checkpoint's ack, run the guest
//
// The session's codec is the sender's, if the receiver's hello accepts it,
// else none: then every Pages, Disk and State frame is stored. A sender stores a section
// that would not shrink. A receiver refuses any other codec, and data
// that does not decompress to exactly the announced length (it never
// decompresses past the cap). Sealing comes after compression: the tag
// covers the compressed bytes. With deltas on, a page section may hold
// xor entries (container.EncXOR), which each end applies against its
// shadow of what this stream shipped, and copy entries (container.EncCopy,
// version 8), a reference to a page of that shadow with the same bytes
// (delta.go; docs/STREAM.md, Deltas).
//
// A checkpoint's Disk frames cost at most MaxCheckpointDisk: a frame with
// data its length, a zero run ZeroRunCost (version 11). The
// End frame's sum is sum64 (sum.go) of the checkpoint's sections: for each
// Pages, Disk and State frame in frame order, a block of its container
// section type and length, then the section's payload (a Pages, Disk or
// State frame's section decompressed, and a State chunk un-XORed: the sum
// also checks what the receiver made of the bytes). In a keyed session
// (version 10) it leaves out every section that travelled as it is
// applied (a stored Pages or Disk frame's, a State frame's sent whole and
// stored): AES-256-GCM authenticated those bytes already, so only a
// section the receiver decoded, what it made of authenticated bytes, is
// summed. Up to version 8 it was the container's CRC32C
// (container.Checksum) of the same sections, which the lab's emulated CPU
// computes 30 times slower.
//
// Handshake: the sender sends Hello, the receiver Hello; with th = SHA-256
// over both hello payloads, the sender sends Auth(HMAC(K, "govmm-stream/1
// proof sender" || th)), the receiver verifies it and the identity and
// answers Auth(HMAC(K, "… proof receiver" || th)). The session keys, used
// as AES-256 keys, are HMAC(K, "govmm-stream/1 key sender-to-receiver" ||
// th) and the reverse (the labels keep their "/1"; th binds the version);
// under AEGIS-128L, the first 16 bytes of HMAC(K, "govmm-stream/1 key
// sender-to-receiver aegis-128l" || th) and the reverse; under
// AEGIS-128X2, the same with "aegis-128x2".
// Both ends then use the larger of the two failover timeouts. The
// receiver runs Config.Verify on the sender's identity and answers Accept,
// or an Error frame; the sender's Dial returns only then. Without a key
// (Config.Insecure) the same proofs run over an empty K, and the session
// frames carry the CRC32C trailer instead of being sealed under keys
// anyone could compute (version 6 did that: AES-GCM for show, which cost
// most of a migration's time where AES is slow).
//
// # Goroutines
//
// Sender: the caller's checkpoint goroutine (Begin/SendPage/SendStablePage/SendSummedPage/SendDisk/
// SendDiskZero/SendState/End/Handover), the sealer, which seals and writes the Pages
// frames the checkpoint goroutine hands it while that one fills the next
// (pipeline.go; unkeyed, a frame of SendStablePage's or SendSummedPage's references is
// summed and written by the checkpoint goroutine itself; keyed, the sealer seals it in
// parts from where its pages lie), an ack reader, a heartbeat sender and a failure
// detector. Receiver: the caller's goroutine inside Run (drives the
// sinks and OnCommit, sends acks), a StagingSink's commit workers (a
// committed checkpoint's copy into memory, from the ack until Run
// settles it), Run's reader, which reads, opens, decodes and
// sums the frames ahead of it (recvpipe.go), a heartbeat sender and a
// failure detector, both from the Accept on. Listener: an accept
// loop and one goroutine per connection's handshake. Frame writes are
// serialized by one mutex per end. Close on either stops its goroutines
// and waits for them.
package stream
