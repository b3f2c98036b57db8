package replicate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"govmm/replicate/stream"
	"govmm/virtio/netback"
	"govmm/vmm"
)

// This file is failover policy, in one place: why a standby decides that
// its primary is lost (and when it must not), how it announces the guest's
// new home, and what role a VMM plays for its guest.

// Takeover says why and from where a standby took over.
type Takeover struct {
	Epoch uint64 // the checkpoint the guest resumed from
	Cause error  // why the primary was declared lost; nil for a migration's handover
	Took  time.Duration
	// Fence holds the generation the standby won at the witness before it
	// resumed the guest (nil without a witness); Claim is how long winning
	// it took (part of Took).
	Fence *Fence
	Claim time.Duration
}

// shouldTakeOver decides what a standby does once its stream has ended
// with runErr: nil to run the guest, or the reason not to, which wraps
// errListenAgain when the standby should wait for a source again.
//
//	handover after a committed final checkpoint   run (migration)
//	goodbye (also after a final: aborted)         discard, stop standing by
//	silence / connection lost, with a checkpoint  take over
//	silence / connection lost, none yet           discard, listen again
//	anything else (corrupt, forged, refused)      discard, listen again
func shouldTakeOver(runErr error, handedOver, haveCheckpoint bool) error {
	switch {
	case runErr == nil && handedOver:
		return nil
	case runErr == nil:
		return errors.New("standby: the primary stopped replication; the replica is discarded")
	case !primaryLost(runErr):
		// A corrupted, forged or refused stream says nothing about the
		// primary's health: taking over could run the guest twice. The
		// replica is dropped; the primary goes on unprotected.
		return fmt.Errorf("standby: stream refused, not taking over (the primary runs unprotected): %w: %w", runErr, errListenAgain)
	case !haveCheckpoint:
		return fmt.Errorf("standby: primary lost before the first checkpoint, nothing to resume: %w: %w", runErr, errListenAgain)
	}
	return nil
}

// primaryLost tells a dead or unreachable primary (silence, or its end of
// the connection gone without a goodbye) from a stream that is corrupt or
// not from our primary, after which the standby must not take over.
func primaryLost(err error) bool {
	if errors.Is(err, stream.ErrPeer) {
		return false // the primary itself refused something: it is alive
	}
	return errors.Is(err, stream.ErrTimeout) || errors.Is(err, stream.ErrTruncated)
}

// NIC is one guest network interface as failover sees it.
type NIC struct {
	// Out is the NIC's output buffer, through which announcements leave.
	Out *OutputBuffer
	MAC net.HardwareAddr
	// IP is the guest's IPv4 address on it, if known: a gratuitous ARP
	// for it joins the RARP.
	IP netip.Addr
}

// Announce tells the network where the guest's MACs now live, after a
// failover or a migration: a RARP for each (switches learn the port) and,
// where the guest's address is known, a gratuitous ARP.
func Announce(nics []NIC) {
	for _, n := range nics {
		frames := [][]byte{netback.RARP(n.MAC)}
		if n.IP.Is4() {
			frames = append(frames, netback.GARP(n.MAC, net.IP(n.IP.AsSlice())))
		}
		for _, fr := range frames {
			if n.Out.VnetHdr() {
				fr = append(make([]byte, netback.VnetHdrLen), fr...)
			}
			_ = n.Out.Send(fr)
		}
	}
}

// Origin is how a VMM came to run its guest.
type Origin uint8

const (
	// Booted: started here (run, restore).
	Booted Origin = iota
	// TookOver: a standby that took over when its primary was lost.
	TookOver
	// Migrated: the destination of a live migration.
	Migrated
)

// Role is what a VMM is to its guest's replication now.
type Role uint8

const (
	// RoleAlone: the guest runs here and nothing replicates it.
	RoleAlone Role = iota
	// RolePrimary: the guest runs here and is replicated to a standby
	// (ProtectedNow says whether that standby is still there).
	RolePrimary
)

// ErrReplicating and ErrNotReplicating are a Node's refusals;
// ErrWouldUnprotect, wrapped with ErrReplicating, is its refusal to
// migrate a guest that a standby protects.
var (
	ErrReplicating    = errors.New("already replicating")
	ErrNotReplicating = errors.New("not replicating")
	ErrWouldUnprotect = errors.New("migrating would drop the guest's protection")
)

// Node is one VMM's place in its guest's replication: how it came to run
// the guest, and the replication that protects it now, if any. Its
// methods may be called from any goroutine.
type Node struct {
	origin     Origin
	tookOverAt uint64 // the checkpoint a TookOver node resumed from
	fence      *Fence // nil without a witness

	// Lock order: op, then mu.
	op   sync.Mutex // serialises Protect and Unprotect (held across a start or stop)
	mu   sync.Mutex // guards rep and peer; held only briefly, so Describe never waits
	rep  *Replicator
	peer string
}

// NewNode describes a VMM running its guest: booted here, or taken over
// (from checkpoint tk.Epoch), or migrated in. fence is its lease at the
// witness (nil without one): every replication and migration it starts
// uses it.
func NewNode(origin Origin, tk Takeover, fence *Fence) *Node {
	return &Node{origin: origin, tookOverAt: tk.Epoch, fence: fence}
}

// Fence is the node's lease at the witness, or nil.
func (n *Node) Fence() *Fence { return n.fence }

// ErrFencedNode is a fenced node's refusal to replicate or migrate.
var ErrFencedNode = errors.New("this VMM is fenced")

func (n *Node) checkFenced() error {
	if n.fence != nil {
		if err := n.fence.Err(); err != nil {
			return fmt.Errorf("%w: %w", ErrFencedNode, err)
		}
	}
	return nil
}

// Protect starts replicating m to a standby (StartReplication, with the
// node's Fence); it returns once the guest is protected. A node that
// already replicates refuses (ErrReplicating) until that replication has
// ended; a fenced one refuses (ErrFencedNode).
func (n *Node) Protect(ctx context.Context, m *vmm.Machine, cfg ReplicateConfig) (*Replicator, error) {
	if !n.op.TryLock() {
		return nil, fmt.Errorf("%w: replication is being started or stopped, or a migration runs", ErrReplicating)
	}
	defer n.op.Unlock()
	if err := n.checkFenced(); err != nil {
		return nil, err
	}
	if cfg.Fence == nil {
		cfg.Fence = n.fence
	}
	if r := n.Replicator(); r != nil {
		select {
		case <-r.Done():
			// Its standby was lost. Stopping it resumes a guest the pause
			// policy stopped: the operator decided to protect it anew.
			r.Stop()
		default:
			return nil, fmt.Errorf("%w to %s", ErrReplicating, n.Peer())
		}
	}
	rep, err := StartReplication(ctx, m, cfg)
	if err != nil {
		return nil, err
	}
	peer := cfg.To
	if cfg.Transport != nil {
		peer = "null (benchmark: not protected)"
	}
	n.mu.Lock()
	n.rep, n.peer = rep, peer
	n.mu.Unlock()
	return rep, nil
}

// Migrate live-migrates the guest (Migrate). Replication and migration
// cannot run together (each dirty tracker would miss the pages the other
// harvested, and the destination's memory would differ), and the
// destination starts with no standby: so a node that replicates refuses
// (ErrReplicating wrapping ErrWouldUnprotect) unless dropProtection is
// set. Then it stops replication first (the standby discards its replica,
// as Unprotect does), and the result's DroppedProtection names that
// standby: the guest runs unprotected from then on, here if the migration
// fails, at the destination if it succeeds.
func (n *Node) Migrate(ctx context.Context, m *vmm.Machine, cfg MigrateConfig, dropProtection bool) (MigrateResult, error) {
	if !n.op.TryLock() {
		return MigrateResult{}, fmt.Errorf("%w: replication is being started or stopped", ErrReplicating)
	}
	defer n.op.Unlock()
	if err := n.checkFenced(); err != nil {
		return MigrateResult{}, err
	}
	var dropped string
	if r := n.Replicator(); r != nil {
		select {
		case <-r.Done():
		default:
			if !dropProtection {
				return MigrateResult{}, fmt.Errorf("%w to %s: %w", ErrReplicating, n.Peer(), ErrWouldUnprotect)
			}
			dropped = n.Peer()
			r.Stop()
			n.mu.Lock()
			n.rep, n.peer = nil, ""
			n.mu.Unlock()
		}
	}
	if cfg.Fence == nil {
		cfg.Fence = n.fence
	}
	res, err := Migrate(ctx, m, cfg)
	if err != nil && dropped != "" {
		return res, fmt.Errorf("%w (replication to %s was stopped for it: the guest runs here UNPROTECTED)", err, dropped)
	}
	res.DroppedProtection = dropped
	return res, err
}

// Unprotect stops replication; the standby discards its replica.
func (n *Node) Unprotect() error {
	n.op.Lock()
	defer n.op.Unlock()
	r := n.Replicator()
	if r == nil {
		return ErrNotReplicating
	}
	r.Stop()
	n.mu.Lock()
	n.rep, n.peer = nil, ""
	n.mu.Unlock()
	return nil
}

// Origin is how this VMM came to run its guest.
func (n *Node) Origin() Origin { return n.origin }

// Replicator is the current replication, or nil.
func (n *Node) Replicator() *Replicator {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.rep
}

// Role is what the node is now.
func (n *Node) Role() Role {
	if n.Replicator() != nil {
		return RolePrimary
	}
	return RoleAlone
}

// Peer is the standby's address while replicating, else "".
func (n *Node) Peer() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.peer
}

// Describe is the role in words, as govmm ctl info shows it.
func (n *Node) Describe() string {
	if n.fence != nil && n.fence.Err() != nil {
		return "FENCED (another VMM runs this guest now)"
	}
	if r := n.Replicator(); r != nil {
		if r.Stats().Protected {
			return "primary (protected)"
		}
		return "primary (UNPROTECTED)"
	}
	switch n.origin {
	case TookOver:
		return fmt.Sprintf("former standby, took over at checkpoint %d", n.tookOverAt)
	case Migrated:
		return "migrated in"
	}
	return ""
}

// Fencing is the node's standing at the witness in words, as govmm ctl
// info shows it ("" without a witness).
func (n *Node) Fencing() string {
	if n.fence == nil {
		return ""
	}
	return n.fence.Describe()
}

// Metrics are the current replication's metrics (none when not
// replicating) and the Fence's.
func (n *Node) Metrics() []Metric {
	var out []Metric
	if r := n.Replicator(); r != nil {
		out = r.Metrics()
	}
	if n.fence != nil {
		out = append(out, n.fence.Metrics()...)
	}
	return out
}
