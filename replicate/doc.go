// Package replicate owns the Remus protocol: the initial sync, epochs and
// their staging buffer, the checkpoint stream (replicate/stream), acks,
// network output buffering, disk write mirroring, heartbeats, failover
// and re-protection. Live migration is the same stream ended by a planned
// handover. It does not know how a device works: devices are saved and
// restored through vmm.MachineState.
//
// # Files
//
//   - precopy.go: the pre-copy loop (disks, then memory rounds), shared by
//     the initial sync and Migrate.
//   - config.go: ReplicateConfig, its defaults and the standby-loss
//     policies.
//   - primary.go: Replicator, the primary's epoch loop (with backpressure);
//     adapt.go the length of each epoch under adaptive epochs (MaxEpoch);
//     metrics.go its stats and metrics (pause and ack time as histograms
//     over DurationBuckets).
//   - standby.go: Standby, the receiving end of replication and migration.
//   - failover.go: failover policy in one place (when to take over, the
//     announcement, and Node: the typed role of a VMM towards its guest).
//   - outbuf.go, disk.go: output commit; disk copy and mirroring (DiskLog
//     on the primary, a stream.DiskSink on the standby).
//   - transport.go: what a Replicator ships through (stream.Sender, or the
//     null transport of benchmarks).
//   - migrate.go: live migration.
//   - fence.go: Fence, a VMM's side of the witness (docs/FENCING.md): the
//     lease gates every frame of output; the generation is advanced before
//     output runs ahead of a standby left behind; fencing stops the VMM.
//   - claim.go: the standby's side of the witness: which sources it
//     serves, the claim of the next generation before a replica runs, and
//     what it knows and receives meanwhile (Status, Metrics).
//
// # Epochs
//
// The Replicator alone numbers epochs. At checkpoint N's cut it seals each
// OutputBuffer with N (the buffer checks that numbers increase) and takes
// each DiskLog's writes into N's payload; the ack of N releases the output
// sealed up to N.
//
// # Invariants
//
//   - Output commit (DESIGN.md 1, 7): no frame of an epoch leaves before the
//     standby acknowledged it; on every other end (standby lost, Stop, a
//     failed start) held frames are dropped, never sent.
//   - Disk (5): the standby's disks equal the primary's at every
//     acknowledged checkpoint: the initial sync copies them, then each
//     checkpoint carries its epoch's writes, applied and synced before the
//     ack.
//   - Slow is not dead (9): a slow standby stretches the epochs
//     (MaxUnacked) and is not given up; a standby takes over only a primary
//     that is silent or whose connection died without a goodbye, never on
//     a goodbye or a refused stream.
//   - One emitter at a migration: the destination runs the guest only on a
//     Handover, which the source sends only after the final ack and after
//     which it never resumes; a source that resumes first says goodbye.
//   - Exactly one emitter (8), with a witness: a frame leaves only while
//     the VMM's lease is valid by its own clock (the gate, asked outside
//     the checkpoint pause); a standby runs the guest only after winning
//     the next generation; output never runs ahead of a standby's replica
//     before the generation has been advanced past that standby's; a VMM
//     that learns of a newer generation is fenced for good (no frame, no
//     disk write, vCPUs stopped).
//
// # Goroutines
//
// A Replicator runs its epoch loop (checkpoints: pause, copy, resume, then
// stream), an ack goroutine that releases output as acks arrive, so that
// sending the guest's frames never delays the stream's reader, and one
// goroutine per disk forwarding its pressure signal. Stop ends them all
// and waits for the loop. A Standby's Receive* run on the caller's
// goroutine (the claim of a generation too); its Build runs on the stream
// Listener's, one at a time; with a witness, a poller asks the witness
// every half lease until the guest runs there or Close. A Fence has one
// goroutine (advance, fencing), ended by Close; its lease renews on its
// own (package witness).
package replicate
