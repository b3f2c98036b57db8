package replicate

import (
	"fmt"
	"log/slog"
	"time"

	"govmm/replicate/stream"
)

// What a user sets when protecting a guest, and its defaults.

// Policies when the standby is lost.
const (
	OnStandbyLossContinue = "continue" // keep running, unprotected, and say so
	OnStandbyLossPause    = "pause"    // stop the guest until an operator decides
)

// Defaults of ReplicateConfig, for a LAN (docs/STREAM.md has the table for
// other links).
const (
	DefaultEpoch           = 25 * time.Millisecond
	DefaultFailoverTimeout = 2 * time.Second
	DefaultMaxUnacked      = 2
	// DefaultCoWPages is where CopyAuto switches from stop-and-copy to
	// copy-on-write (CoWPages): about where copy-on-write's pause plus
	// time to ack fell below stop-and-copy's in govmm bench checkpoint on
	// this project's host (stop-and-copy ahead at 4k dirty pages,
	// copy-on-write at 8k; docs/ARCHITECTURE.md §6).
	DefaultCoWPages = 6144
)

// ReplicateConfig parameterises continuous replication to a standby.
type ReplicateConfig struct {
	// To is the standby's HOST:PORT, dialled with Key (or Insecure), unless
	// Transport is set.
	To string
	// Transport, if set, replaces the connection to To: NewNullTransport
	// (benchmarks) ships checkpoints nowhere.
	Transport Transport
	Name      string
	Key       []byte
	Insecure  bool
	// Compression is the codec for the stream's pages
	// (stream.DefaultCompression, none, when zero).
	Compression stream.Compression
	// Cipher is what a keyed stream seals with (stream.Config.Cipher:
	// AEGIS-128L where both ends run it, when zero).
	Cipher stream.Cipher
	// SendBuffer is the stream's socket send buffer
	// (stream.Config.SendBuffer: fixed at 256 KiB on a short link, the
	// kernel's elsewhere, when zero).
	SendBuffer int
	// Deltas ships pages the standby already holds as XOR deltas, and
	// pages whose bytes it holds at any gpa as copies, if the standby
	// agrees (stream.Config.Deltas: a copy of guest memory on each end).
	Deltas bool
	// Devices describe the guest's devices beyond their kind, by device
	// ID (MACs, backends, disk sizes...): a standby whose machine differs
	// is refused at the handshake.
	Devices map[string][]stream.Attr
	// Epoch is the time the guest runs between checkpoints
	// (DefaultEpoch).
	Epoch time.Duration
	// Copy is how each checkpoint copies the dirty pages (CopyAuto when
	// empty).
	Copy CopyMode
	// CoWPages is, with CopyAuto, the dirty set from which a checkpoint
	// copies on write: one with fewer dirty pages copies them with the
	// guest stopped (DefaultCoWPages when 0; at least 1). Stop and CoW
	// ignore it.
	CoWPages int
	// NoPreHarvest takes the whole dirty-log harvest in the pause, as
	// before the pre-harvest (preharvest.go) existed: for measuring it.
	NoPreHarvest bool
	// MaxEpoch, if set, makes epochs adaptive: when the guest dirties so
	// much that the pause or the stream would fall behind, the epoch
	// lengthens, up to MaxEpoch, and shortens back toward Epoch when the
	// load falls (adapt.go). The loop never aims past MaxEpoch: held
	// output waits at most MaxEpoch plus a pause and an ack while the
	// standby keeps up (backpressure still stretches epochs when it does
	// not). 0 keeps every epoch at Epoch; otherwise at least Epoch.
	MaxEpoch time.Duration
	// FailoverTimeout: while listening, without a byte from the standby
	// for this long, it is declared lost (DefaultFailoverTimeout). The
	// standby's, if larger, wins.
	FailoverTimeout time.Duration
	// AckSpin is stream.Config's: how long the stream's ack reader, once
	// a checkpoint's End is out, polls for its ack before it sleeps (0 or
	// negative: never, the default). The CPU it spends is the primary's.
	AckSpin time.Duration
	// MaxUnacked bounds the checkpoints in flight: the next is not taken
	// while this many are unacknowledged, so a slow standby stretches the
	// epochs instead of falling behind (DefaultMaxUnacked).
	MaxUnacked int
	// OnStandbyLoss is OnStandbyLossContinue (default) or OnStandbyLossPause.
	OnStandbyLoss string
	// Outputs are the network output buffers whose frames wait for their
	// epoch's ack (one per NIC).
	Outputs []*OutputBuffer
	// InitialRounds bounds the pre-copy rounds of the initial sync.
	InitialRounds int
	// Progress, if set, is told how the initial sync goes: every few MiB
	// sent and after each round, from the goroutine that starts
	// replication. It must not block.
	Progress func(SyncProgress)
	Logger   *slog.Logger
	// Disks are the logs of the guest's disks (in device order): the
	// initial sync copies each, and each epoch's writes travel in its
	// checkpoint.
	Disks []*DiskLog
	// Fence is this VMM's lease at the witness (NewFence); nil without a
	// witness, where split brain cannot be excluded (DESIGN.md invariant
	// 8). Replication starts only once no earlier standby is left behind
	// (the generation is advanced); the hello carries the generation and
	// holder name, from which the standby claims the next generation;
	// when replication ends after the standby got a resumable
	// checkpoint, the Fence holds the guest's output until the generation
	// is advanced past that standby's; a fenced VMM's replication ends.
	Fence *Fence
}

// CopyMode is how a checkpoint copies the guest's dirty pages.
type CopyMode string

// Copy modes.
const (
	// CopyAuto chooses per checkpoint, once the dirty set is harvested
	// in the pause: a set of at least CoWPages pages copies on write, a
	// smaller one copies with the guest stopped, whose pause is then at
	// most about a millisecond longer and whose ack comes sooner (the
	// copy is not in the way of shipping). Where the host lacks userfaultfd write-protect for
	// guest memory (probed when replication starts) every checkpoint
	// stops to copy, said once in the log.
	CopyAuto CopyMode = "auto"
	// CopyStop copies every dirty page while the guest is stopped: the
	// pause grows with the dirty set (about 0.5 µs a page).
	CopyStop CopyMode = "stop"
	// CopyCoW write-protects the dirty pages while the guest is stopped
	// and copies them after it has resumed; a guest write to a page not
	// yet copied waits until it is. Replication fails to start where the
	// host cannot.
	CopyCoW CopyMode = "cow"
)

// ParseCopyMode checks a copy mode a user gave (auto, stop or cow).
func ParseCopyMode(s string) (CopyMode, error) {
	switch m := CopyMode(s); m {
	case CopyAuto, CopyStop, CopyCoW:
		return m, nil
	}
	return "", fmt.Errorf("checkpoint copy %q: want %s, %s or %s", s, CopyAuto, CopyStop, CopyCoW)
}

// CheckCoWPages says why n cannot be a CoWPages, or nil; the one check of
// --checkpoint-cow-pages (run, standby).
func CheckCoWPages(n int) error {
	if n < 1 {
		return fmt.Errorf("must be at least 1")
	}
	return nil
}

// SyncProgress is how far the initial sync has got.
type SyncProgress struct {
	// Round is the memory round being sent: 0 while the disks are copied,
	// 1 for the first full copy of memory, then the rounds that send what
	// the guest dirtied meanwhile.
	Round int
	// Copied is the disk and memory bytes sent so far, in all rounds.
	Copied uint64
	// Total is the first full copy: every disk and all of memory. Copied
	// reaches it at the end of round 1 and passes it in later rounds.
	Total uint64
	// Acking: the copy is sent and so is the first checkpoint; the
	// standby may still be applying what it received, and its ack, which
	// protects the guest, is awaited. The last update.
	Acking bool
}

// Bounds of what a user may set. Below MinEpoch a checkpoint's pause
// (about half a millisecond) would leave the guest little time to run;
// below MinFailoverTimeout heartbeats (a quarter of it) could not keep a
// healthy peer from being declared lost.
const (
	MinEpoch           = time.Millisecond
	MinFailoverTimeout = 10 * time.Millisecond
)

// CheckEpoch says why d cannot be an epoch, or nil. It is the one check
// of every epoch a user gives: govmm run --epoch, govmm standby --epoch
// and the control API's replicate request (govmm ctl replicate --epoch).
func CheckEpoch(d time.Duration) error {
	if d < MinEpoch {
		return fmt.Errorf("must be at least %v", MinEpoch)
	}
	return nil
}

// CheckMaxEpoch says why d cannot be a MaxEpoch, or nil: 0 (fixed
// epochs) or an epoch CheckEpoch accepts. The one check of --epoch-max
// (run, standby, govmm ctl replicate); that it is not below the epoch is
// checked when replication starts.
func CheckMaxEpoch(d time.Duration) error {
	if d == 0 {
		return nil
	}
	return CheckEpoch(d)
}

// CheckFailoverTimeout says why d cannot be a failover timeout, or nil;
// the one check of --failover-timeout (run, standby).
func CheckFailoverTimeout(d time.Duration) error {
	if d < MinFailoverTimeout {
		return fmt.Errorf("must be at least %v", MinFailoverTimeout)
	}
	return nil
}

// withDefaults fills in the defaults (for a zero Epoch or FailoverTimeout)
// and checks the values: a negative or too short one is an error, never
// replaced by a default.
func (cfg ReplicateConfig) withDefaults() (ReplicateConfig, error) {
	if cfg.Epoch == 0 {
		cfg.Epoch = DefaultEpoch
	}
	if err := CheckEpoch(cfg.Epoch); err != nil {
		return cfg, fmt.Errorf("epoch %v: %w", cfg.Epoch, err)
	}
	if err := CheckMaxEpoch(cfg.MaxEpoch); err != nil {
		return cfg, fmt.Errorf("epoch-max %v: %w", cfg.MaxEpoch, err)
	}
	if cfg.MaxEpoch != 0 && cfg.MaxEpoch < cfg.Epoch {
		return cfg, fmt.Errorf("epoch-max %v below the epoch %v", cfg.MaxEpoch, cfg.Epoch)
	}
	if cfg.FailoverTimeout == 0 {
		cfg.FailoverTimeout = DefaultFailoverTimeout
	}
	if err := CheckFailoverTimeout(cfg.FailoverTimeout); err != nil {
		return cfg, fmt.Errorf("failover timeout %v: %w", cfg.FailoverTimeout, err)
	}
	if cfg.MaxUnacked <= 0 {
		cfg.MaxUnacked = DefaultMaxUnacked
	}
	if cfg.OnStandbyLoss == "" {
		cfg.OnStandbyLoss = OnStandbyLossContinue
	}
	if cfg.OnStandbyLoss != OnStandbyLossContinue && cfg.OnStandbyLoss != OnStandbyLossPause {
		return cfg, fmt.Errorf("on-standby-loss %q: want %s or %s", cfg.OnStandbyLoss, OnStandbyLossContinue, OnStandbyLossPause)
	}
	if cfg.Copy == "" {
		cfg.Copy = CopyAuto
	}
	if _, err := ParseCopyMode(string(cfg.Copy)); err != nil {
		return cfg, err
	}
	if cfg.CoWPages == 0 {
		cfg.CoWPages = DefaultCoWPages
	}
	if err := CheckCoWPages(cfg.CoWPages); err != nil {
		return cfg, fmt.Errorf("checkpoint cow-pages %d: %w", cfg.CoWPages, err)
	}
	if cfg.InitialRounds <= 0 {
		cfg.InitialRounds = 10
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return cfg, nil
}
