// Package witness is the arbiter that keeps a protected guest's output to
// one VMM at a time (DESIGN.md invariant 8, "exactly one emitter"), and
// the fencing primitives a VMM uses with it. docs/FENCING.md has the
// protocol, the argument for why two emitters cannot coexist, the lease
// timing and the clock assumptions.
//
// A witness (Server, `govmm witness`) keeps, per protected VM, a
// generation number and the name of the VMM that holds it, saved durably
// before any generation is granted. It grants leases on the current
// generation. A VMM (Client) holds at most one generation at a time as a
// Lease:
//
//   - a primary starting protection calls Client.Acquire: generation
//     current+1, once no other VMM's lease is valid;
//   - a standby whose replica descends from generation g calls
//     Client.Claim(g) before it resumes the guest: generation g+1, granted
//     only if g is still current and its holder's lease has run out at the
//     witness;
//   - the holder renews its lease in the background; its release path
//     asks Lease.CanRelease before letting any output out;
//   - a holder that lets out output its standby has not acknowledged (it
//     goes on alone) first calls Lease.Advance, which moves it to the
//     next generation so that the standby left behind can never claim;
//   - a holder handing over on purpose calls Lease.Resign.
//
// It owns the wire protocol between VMMs and the witness (authenticated
// with the replication stream's pre-shared key, frames sealed with
// AES-256-GCM, sequence numbers against replay), the witness's state
// machine and state file, and the holder's lease bookkeeping. It does not
// own what a VMM does with the answer: holding or dropping frames,
// pausing vCPUs on fencing, ctl info and metrics belong to package
// replicate and cmd/govmm.
//
// # Invariants
//
//   - A generation is granted at most once, to one holder, and never
//     forgotten: a new generation is saved (write, fsync, rename, fsync
//     the directory) before it is granted; a save that may or may not
//     have reached the disk stops the witness; the state directory is
//     locked against a second witness.
//   - The witness grants the next generation to another VMM only after
//     the current one's lease has run out by its clock; after a restart
//     it counts every lease as renewed at the restart.
//   - A holder's validity is counted on its own clock (CLOCK_BOOTTIME,
//     which keeps counting through a suspend) from when it sent the
//     request, shortened for clock-rate drift (MaxDrift) and by a margin:
//     it ends before the witness's lease does, whatever the delays.
//   - Fencing is sticky: once a holder learns that a higher generation
//     belongs to another VMM, CanRelease is false for good, its Client
//     refuses to acquire or claim again, and Fenced is closed.
//   - No network I/O and no lock behind CanRelease: it reads the clock
//     and three atomics, so it may sit in a checkpoint pause or a release
//     path.
//
// # Goroutines
//
// Server: the accept loop (Serve) and one goroutine per connection; the
// state table is guarded by Server.mu, held across a grant's fsync. Close
// stops and waits for them all.
//
// Client: no goroutine of its own; each request holds Client.mu for its
// round trip (one request in flight per connection). Lease: one renewal
// goroutine, started by Acquire or Claim and stopped by Close, Resign or
// fencing. CanRelease, ValidUntil, Status, Fenced and Err are safe from
// any goroutine.
package witness
