package stream

import (
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Defaults for the zero values in Config.
const (
	DefaultHeartbeatInterval = 250 * time.Millisecond
	DefaultFailoverTimeout   = time.Second
	DefaultHandshakeTimeout  = 30 * time.Second
	// DefaultStallTimeout bounds how long a write may make no progress at
	// all while the peer is alive (its heartbeats arrive) before the
	// stream fails with ErrStalled: a peer that is busy is waited for; one
	// that takes nothing for this long is stuck.
	DefaultStallTimeout = 30 * time.Second
	// MaxTimeout caps the failover timeout either end may announce.
	MaxTimeout = 10 * time.Minute
)

// Config configures either end of a stream. Fields marked "sender" or
// "receiver" are ignored on the other end.
type Config struct {
	// Key is the pre-shared key (see LoadKey). Both ends must hold the
	// same one.
	Key []byte
	// Insecure allows a stream without a key, for loopback use only: the
	// frames travel in clear with a CRC32C trailer (and the End frame's
	// sum), which catches corruption and nothing else. Both ends must
	// agree; a keyed end refuses an unkeyed peer.
	Insecure bool

	// Identity is, on the sender, the VM being streamed (required); on the
	// receiver, the VM it expects, or zero to accept any (the lead then
	// checks Receiver.Peer itself).
	Identity Identity

	// HeartbeatInterval is how often this end sends a heartbeat.
	HeartbeatInterval time.Duration
	// FailoverTimeout is how long an end listens without receiving a byte
	// before it declares the peer lost (ErrTimeout). At least twice
	// HeartbeatInterval. The two ends announce theirs in the hello and
	// both use the larger one: no end is declared dead sooner than it
	// expects. Time an end spends not listening (applying a checkpoint,
	// syncing a disk, its own stalls) is not counted as the peer's silence.
	FailoverTimeout time.Duration
	// StallTimeout: a write that makes no progress for this long fails the
	// stream (ErrStalled) even though the peer is alive; 0 means
	// DefaultStallTimeout, and it is never below four failover timeouts.
	StallTimeout time.Duration
	// HandshakeTimeout bounds the handshake, the receiver's Verify
	// included (real time).
	HandshakeTimeout time.Duration
	// Compression, on a sender, is the codec it compresses Pages frames
	// with, if the receiver accepts it (else they travel stored, and the
	// sender says so in its log); on a receiver, CompressNone refuses
	// compressed frames and any other value accepts every codec. The zero
	// value is DefaultCompression on a sender.
	Compression Compression
	// Deltas, on both ends, lets a sender ship a page it shipped before
	// as its XOR with that version, and a page whose bytes it shipped at
	// any gpa as a copy of that page (both ends then keep a copy of the
	// guest's memory as shipped: the guest's memory size, on each end;
	// the sender also an index of it by content). Both must set it, or
	// pages travel whole.
	Deltas bool
	// Cipher is what a keyed session seals its frames with: by default
	// (CipherAuto) AEGIS-128X2 where both ends' CPUs have VAES, else
	// AEGIS-128L where both run it, several times faster than
	// AES-256-GCM, and AES-256-GCM otherwise.
	Cipher Cipher

	// Clock drives heartbeats and the failure detector; nil means the
	// system clock.
	Clock Clock
	// Logger; nil means slog.Default().
	Logger *slog.Logger

	// OnFailure, if set, is called once, on its own goroutine, when the
	// stream fails for any reason other than a local Close or a clean
	// goodbye: this is the failure detector's output.
	OnFailure func(err error)

	// Verify (receiver), if set, sees the sender's identity once it has
	// authenticated and decides whether this receiver serves it: an error
	// refuses the sender, who is told why in an Error frame (wrap
	// ErrMismatch for a VM this receiver cannot resume). The sender's Dial
	// returns only after this verdict.
	Verify func(peer Identity) error
	// OnRefused (Listener), if set, is told of every connection refused
	// before it became a stream: a failed handshake, a failed Verify, or a
	// second sender while one is being served. The Listener keeps
	// listening. nil logs them.
	OnRefused func(err error)

	// Sink (receiver) stages the pages of each checkpoint; nil means a
	// new MemSink.
	Sink PageSink
	// Disks (receiver) stages the disk writes of each checkpoint; nil
	// refuses Disk frames.
	Disks DiskSink
	// ReadSpin (receiver) is how long the reader, inside a checkpoint
	// (after its Begin, before its End), polls a drained connection for
	// the next bytes before it sleeps until they arrive: a wakeup costs
	// 0.1-0.4 ms on a virtual machine whose idle CPUs halt (poll.go).
	// 0 means DefaultReadSpin; negative, never poll. At most 10 ms.
	ReadSpin time.Duration
	// AckSpin (sender) is how long the ack reader, once a checkpoint's
	// End is out and until its ack, polls a drained connection for the
	// ack before it sleeps until it arrives: the ack then finds the
	// sender's CPU awake instead of having to wake it (Sender.pollsForAck;
	// docs/STREAM.md, "Waiting for the ack awake"). 0 or negative: never
	// poll (the default: measured, it was not a clear gain). At most 10 ms.
	AckSpin time.Duration
	// SendBuffer (sender) is its socket's send buffer (SO_SNDBUF) once
	// the handshake is done: SendBufferAuto (0, the default) fixes it at
	// ShortLinkSendBuffer where the handshake's shortest round trip was
	// at most ShortLinkRTT, and leaves it to the kernel's autotuning
	// otherwise; SendBufferKernel always leaves it to the kernel; a
	// positive value fixes it at that many bytes (sndbuf.go;
	// docs/STREAM.md, "A short link's send buffer").
	SendBuffer int
	// OnCommit (receiver), if set, is called with each verified checkpoint
	// before the sink commits and before the ack: returning an error
	// refuses the checkpoint (ErrCommit), which is then aborted.
	OnCommit func(c *Checkpoint) error
}

// ErrConfig is wrapped by configuration errors.
var ErrConfig = errors.New("invalid stream config")

func (c Config) withDefaults() (Config, error) {
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.FailoverTimeout == 0 {
		c.FailoverTimeout = max(DefaultFailoverTimeout, 2*c.HeartbeatInterval)
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = DefaultStallTimeout
	}
	if c.ReadSpin == 0 {
		c.ReadSpin = DefaultReadSpin
	}
	if c.Compression > CompressZstd {
		return c, fmt.Errorf("%w: unknown %v", ErrConfig, c.Compression)
	}
	if c.Cipher > CipherAEGISX2 {
		return c, fmt.Errorf("%w: unknown %v", ErrConfig, c.Cipher)
	}
	if err := c.Cipher.Check(); err != nil {
		return c, fmt.Errorf("%w: stream cipher %v: %v", ErrConfig, c.Cipher, err)
	}
	if c.Clock == nil {
		c.Clock = SystemClock{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	switch {
	case c.HeartbeatInterval < 0 || c.HeartbeatInterval > c.FailoverTimeout/2: // not 2*heartbeat: it wraps
		return c, fmt.Errorf("%w: failover timeout %v must be at least twice the heartbeat interval %v",
			ErrConfig, c.FailoverTimeout, c.HeartbeatInterval)
	case c.ReadSpin > MaxReadSpin:
		return c, fmt.Errorf("%w: read spin %v, at most %v", ErrConfig, c.ReadSpin, MaxReadSpin)
	case c.AckSpin > MaxReadSpin:
		return c, fmt.Errorf("%w: ack spin %v, at most %v", ErrConfig, c.AckSpin, MaxReadSpin)
	case c.SendBuffer < SendBufferKernel || c.SendBuffer > MaxSendBuffer:
		return c, fmt.Errorf("%w: send buffer %d, SendBufferAuto, SendBufferKernel or 1 to %d bytes", ErrConfig, c.SendBuffer, MaxSendBuffer)
	case c.FailoverTimeout > MaxTimeout:
		return c, fmt.Errorf("%w: failover timeout %v, at most %v", ErrConfig, c.FailoverTimeout, MaxTimeout)
	case len(c.Key) == 0 && !c.Insecure:
		return c, fmt.Errorf("%w: no key (give --key-file, or Insecure for loopback use)", ErrConfig)
	case len(c.Key) > 0 && c.Insecure:
		return c, fmt.Errorf("%w: both a key and Insecure", ErrConfig)
	case len(c.Key) > 0 && (len(c.Key) < MinKeyLen || len(c.Key) > MaxKeyLen):
		return c, fmt.Errorf("%w: key of %d bytes, want %d..%d", ErrConfig, len(c.Key), MinKeyLen, MaxKeyLen)
	}
	return c, nil
}
