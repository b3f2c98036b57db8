// Package replicate owns the Remus protocol: the initial sync, epochs and
// their staging buffer, the checkpoint stream (replicate/stream), acks,
// network output buffering, disk write mirroring, heartbeats, failover
// and re-protection. Live migration is the same stream ended by a planned
// handover. It does not know how a device works: devices are saved and
// restored through vmm.MachineState.
package replicate
