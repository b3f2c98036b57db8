package witness

import (
	"errors"
	"fmt"
	"time"
)

// Sentinels for errors.Is. Refusals by the witness come as *Refusal
// (which wraps one of ErrHeld, ErrHolderAlive, ErrSuperseded,
// ErrUnknownVM, ErrRefused), fencing as *FencedError.
var (
	// ErrAuth: a peer without the pre-shared key, or a frame that does
	// not authenticate (forged, replayed, reordered, corrupted).
	ErrAuth = errors.New("witness authentication failed")
	// ErrProtocol: a well-authenticated but malformed or unexpected
	// message, or a truncated frame.
	ErrProtocol = errors.New("witness protocol violation")
	// ErrVersion: the peer speaks another protocol version.
	ErrVersion = errors.New("witness protocol version mismatch")
	// ErrHeld: another holder's lease on the current generation has not
	// run out at the witness yet.
	ErrHeld = errors.New("lease held by another VMM")
	// ErrHolderAlive: the holder renewed its lease while we waited for it
	// to run out: it is alive and reaches the witness.
	ErrHolderAlive = errors.New("the holder is alive: it renewed its lease while we waited")
	// ErrSuperseded: the generation asked for is not the current one.
	ErrSuperseded = errors.New("a newer generation exists")
	// ErrUnknownVM: the witness has no record of the VM (or of a
	// generation this high: its state was lost or rolled back).
	ErrUnknownVM = errors.New("the witness has no record of this generation")
	// ErrRefused: the witness could not serve the request (bad request,
	// state not persisted); its message says why.
	ErrRefused = errors.New("the witness refused the request")
	// ErrFenced: a higher generation belongs to another VMM; this one must
	// never release output again.
	ErrFenced = errors.New("fenced")
)

// Record is what the witness knows of one protected VM.
type Record struct {
	VM         string
	Generation uint64 // current generation; 0 in no record
	Holder     string // who holds it
	Lease      time.Duration
	// Remaining is how long the holder's lease still runs by the
	// witness's clock (0: it ran out, the next generation may be claimed).
	Remaining time.Duration
	// Renewals counts the renewals of this generation since the witness
	// started: a claimant that sees it grow knows the holder is alive.
	Renewals uint64
}

func (r Record) String() string {
	if r.Remaining > 0 {
		return fmt.Sprintf("%s generation %d held by %q, lease %v, %v left", r.VM, r.Generation, r.Holder, r.Lease, r.Remaining.Round(time.Millisecond))
	}
	return fmt.Sprintf("%s generation %d held by %q, lease %v, expired", r.VM, r.Generation, r.Holder, r.Lease)
}

// Refusal is a request the witness answered with no. Reason is one of the
// sentinels above; Record is the witness's view when it refused.
type Refusal struct {
	Addr    string
	Op      string // "acquire", "claim", "advance", "renew", "resign", "status"
	Reason  error
	Record  Record
	Message string // the witness's words, for ErrRefused
}

func (r *Refusal) Error() string {
	rec := r.Record
	switch {
	case errors.Is(r.Reason, ErrHeld), errors.Is(r.Reason, ErrHolderAlive):
		return fmt.Sprintf("witness %s: %s %s: %v: generation %d held by %q (lease %v left)", r.Addr, r.Op, rec.VM, r.Reason, rec.Generation, rec.Holder, rec.Remaining.Round(time.Millisecond))
	case errors.Is(r.Reason, ErrSuperseded):
		return fmt.Sprintf("witness %s: %s %s: %v: generation %d belongs to %q", r.Addr, r.Op, rec.VM, r.Reason, rec.Generation, rec.Holder)
	case errors.Is(r.Reason, ErrRefused):
		return fmt.Sprintf("witness %s: %s %s: %v: %s", r.Addr, r.Op, rec.VM, r.Reason, r.Message)
	}
	return fmt.Sprintf("witness %s: %s %s: %v", r.Addr, r.Op, rec.VM, r.Reason)
}

func (r *Refusal) Unwrap() error { return r.Reason }

// FencedError says why a lease is fenced: generation Current, higher than
// ours, belongs to Holder.
type FencedError struct {
	VM         string
	Generation uint64 // the generation this VMM held
	Current    uint64
	Holder     string
}

func (e *FencedError) Error() string {
	return fmt.Sprintf("fenced: %s is at generation %d, held by %q; this VMM held generation %d and must never release output again", e.VM, e.Current, e.Holder, e.Generation)
}

// Is makes errors.Is(err, ErrFenced) true.
func (e *FencedError) Is(target error) bool { return target == ErrFenced }
