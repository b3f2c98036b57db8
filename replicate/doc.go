// Package replicate owns the Remus protocol: the initial sync, epochs and
// their staging buffer, the checkpoint stream (replicate/stream), acks,
// network output buffering, disk write mirroring, heartbeats, failover
// and re-protection. Live migration is the same stream ended by a planned
// handover. It does not know how a device works: devices are saved and
// restored through vmm.MachineState.
//
// # Files
//
//   - precopy.go: the pre-copy loop, shared by the initial sync and Migrate.
//   - primary.go: Replicator, the primary's epoch loop; metrics.go its stats.
//   - standby.go: Standby, the receiving end of replication and migration.
//   - failover.go: failover policy in one place (when to take over, the
//     announcement, and Node: the typed role of a VMM towards its guest).
//   - outbuf.go, disk.go: output commit and disk mirroring.
//   - transport.go: what a Replicator ships through (stream.Sender, or the
//     null transport of benchmarks).
//   - migrate.go: live migration.
//
// # Epochs
//
// The Replicator alone numbers epochs. At checkpoint N's cut it seals each
// OutputBuffer with N (the buffer checks that numbers increase) and takes
// each DiskLog's writes into N's payload; the ack of N releases the output
// sealed up to N.
//
// # Goroutines
//
// A Replicator runs its epoch loop (checkpoints: pause, copy, resume, then
// stream) and an ack goroutine that releases output as acks arrive, so
// that sending the guest's frames never delays the stream's reader. Stop
// ends both and waits for them. A Standby's Receive* run on the caller's
// goroutine.
package replicate
